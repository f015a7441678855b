"""10,000 events through a real topic on the local broker with a consumer group: all received,
offsets committed, and a reconnecting consumer resumes exactly after the committed offset."""

from __future__ import annotations

import time

import pytest

from kafka import TopicPartition

from dmrstream.contracts import Click, Codec, encode
from dmrstream.kafkaio import create_topics, make_consumer, make_producer, topic_specs

N = 10_000
TS = 1_700_000_000_000


def _events(start: int, stop: int):
    for i in range(start, stop):
        yield Click(event_id=f"e{i}", user_id=i % 97, item_id=i, category_id=i % 7, ts=TS + i)


def _drain(consumer, want: int, timeout_s: float = 60.0) -> list:
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
    return got


def test_round_trip_commit_and_resume(kafka_settings):
    s = kafka_settings
    created = create_topics(s)
    assert set(created) == set(topic_specs(s))
    topic = s.topics.name("clicks")
    producer = make_producer(s)
    for e in _events(0, N):
        producer.send(topic, key=str(e.user_id).encode(), value=encode(e))
    producer.flush()

    codec = Codec(Click, s.limits)
    group = s.topics.prefix + "roundtrip"
    first = make_consumer(s, group, [topic])
    records = _drain(first, N)
    assert len(records) == N
    decoded = [codec.decode(r.value) for r in records]
    assert {e.event_id for e in decoded} == {f"e{i}" for i in range(N)}
    # Keyed by user: every user's events sit in one partition, in production order.
    per_user: dict[int, list[int]] = {}
    parts: dict[int, set[int]] = {}
    for r, e in zip(records, decoded):
        per_user.setdefault(e.user_id, []).append(e.item_id)
        parts.setdefault(e.user_id, set()).add(r.partition)
    assert all(len(p) == 1 for p in parts.values())
    assert all(seq == sorted(seq) for seq in per_user.values())

    # Commit only part of what was read: positions up to the 6,000th record.
    consumed = records[:6_000]
    commit: dict[TopicPartition, int] = {}
    for r in consumed:
        commit[TopicPartition(r.topic, r.partition)] = r.offset + 1
    from kafka.structs import OffsetAndMetadata

    first.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in commit.items()})
    for tp, off in commit.items():
        assert first.committed(tp) == off
    first.close()

    # More events arrive while no consumer runs.
    for e in _events(N, N + 500):
        producer.send(topic, key=str(e.user_id).encode(), value=encode(e))
    producer.flush()
    producer.close()

    second = make_consumer(s, group, [topic])
    rest = _drain(second, N - 6_000 + 500)
    second.close()
    seen_first = {(r.partition, r.offset) for r in consumed}
    seen_second = [(r.partition, r.offset) for r in rest]
    assert len(seen_second) == len(set(seen_second))  # no repeats within the resume
    assert not seen_first & set(seen_second)  # nothing committed is read again
    all_ids = {codec.decode(r.value).event_id for r in consumed} | {codec.decode(r.value).event_id for r in rest}
    assert all_ids == {f"e{i}" for i in range(N + 500)}  # nothing lost
    assert len(consumed) + len(rest) == N + 500


def test_a_fresh_broker_replaces_topics_a_client_auto_created_with_the_wrong_partition_count(kafka_settings):
    """After a restart on the same port a reconnecting client can make tansu auto-create a topic
    (with its default partition count) before `dmrstream broker` creates it."""
    from kafka.admin import NewTopic

    from dmrstream.kafkaio import describe_partitions, make_admin

    specs = topic_specs(kafka_settings)
    samples = kafka_settings.topics.name("samples")
    admin = make_admin(kafka_settings)
    try:
        admin.create_topics([NewTopic(samples, specs[samples] + 3, 1)])
        with pytest.raises(ValueError, match="partitions"):
            create_topics(kafka_settings, admin)  # a real cluster: never silently re-partition
        result = create_topics(kafka_settings, admin, replace_mismatched=True)
        assert result[samples] == "replaced"
        assert describe_partitions(admin, list(specs)) == specs
    finally:
        admin.close()


def _recreate(kafka_settings, topic: str) -> None:
    """Delete ``topic`` and create it again (what a memory broker's restart looks like to a reader)."""
    from dmrstream.kafkaio import make_admin

    admin = make_admin(kafka_settings)
    try:
        admin.delete_topics([topic])
        time.sleep(0.5)
        create_topics(kafka_settings, admin)
    finally:
        admin.close()


def test_topic_id_watch_tells_a_reader_its_topic_was_recreated(kafka_settings):
    """A topic deleted and created again under an assigned reader (what a memory broker's restart
    looks like): the watch says so once, after the first sighting, and not before; every time,
    within a few seconds (nothing else makes kafka-python refresh its metadata: without the
    watch's own refresh, 2 of 3 re-creations went unseen for 15 s)."""
    from dmrstream.kafkaio import TopicIdWatch

    create_topics(kafka_settings)
    topic = kafka_settings.topics.name("clicks")
    parts = [TopicPartition(topic, p) for p in range(topic_specs(kafka_settings)[topic])]
    reader = make_consumer(kafka_settings, None, [])
    reader.assign(parts)
    watch = TopicIdWatch(topic)

    def polls_until(cond, seconds=30.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            reader.poll(timeout_ms=200)
            if cond():
                return True
        return False

    assert polls_until(lambda: not watch.recreated(reader) and watch.known is not None)  # first sighting: False
    first = watch.known
    assert not watch.recreated(reader)  # same topic: nothing to do
    for _ in range(3):
        _recreate(kafka_settings, topic)
        seen = []
        assert polls_until(lambda: seen.append(watch.recreated(reader)) or any(seen), seconds=3 * watch.refresh_s + 2)
        assert watch.known != first and seen.count(True) == 1
        first = watch.known
    reader.close()


def test_a_reader_past_the_end_of_a_recreated_topic_reads_the_new_log_from_its_beginning(kafka_settings):
    """Positions from before a topic was re-created point past the new log's end, and the local
    broker answers such a fetch with nothing (no OFFSET_OUT_OF_RANGE): without reread_recreated
    the reader silently skips the new log's first records (the scorer's lost score requests after
    a broker restart in the reliability soak). With it, every new record is read, once (none
    had been read from the stale positions: fewer records than before on every partition)."""
    from dmrstream.kafkaio import TopicIdWatch, make_producer, reread_recreated

    create_topics(kafka_settings)
    topic = kafka_settings.topics.name("score_requests")
    parts = [TopicPartition(topic, p) for p in range(topic_specs(kafka_settings)[topic])]
    producer = make_producer(kafka_settings, linger_ms=0)

    def produce(prefix: str, n: int) -> None:
        for i in range(n):
            producer.send(topic, key=f"k{i}".encode(), value=f"{prefix}{i}".encode())
        producer.flush()

    def read(readers, want: int, seconds: float = 30.0) -> dict:
        got = {name: [] for name in readers}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not all(len(v) >= want for v in got.values()):
            for name, (consumer, watches) in readers.items():
                polled = consumer.poll(timeout_ms=100)
                got[name] += [r.value.decode() for recs in polled.values() for r in recs]
                if watches:
                    reread_recreated(consumer, watches)
        return got

    readers = {}
    for name, watched in (("plain", False), ("watched", True)):
        c = make_consumer(kafka_settings, None, [])
        c.assign(parts)
        readers[name] = (c, [TopicIdWatch(topic)] if watched else None)
    produce("old", 40)
    assert all(len(v) == 40 for v in read(readers, 40).values())
    _recreate(kafka_settings, topic)
    produce("new", 10)  # fewer than before on every partition: all below the old positions
    got = read(readers, 10, seconds=15.0)
    assert sorted(got["watched"]) == sorted(f"new{i}" for i in range(10))
    assert got["plain"] == []  # what the reader would do without it: the premise of this test
    producer.close()
    for c, _ in readers.values():
        c.close()
