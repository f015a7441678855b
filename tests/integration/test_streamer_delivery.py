"""The streamer's delivery path (``Streamer.handle``) over the real feature store (RocksDB), with
a scripted stand-in for aiokafka's producer so that a delivery can be made to fail on cue: a batch
whose delivery fails is sent again, and is persisted only once acknowledged; the samples are
those of a run without the failure (same ids, labels, histories and counters), serially
(``handle``) and pipelined (``submit``).
Also: the producer authenticates as the app's faust clients do."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
from aiokafka.errors import KafkaTimeoutError, RequestTimedOutError
from kafka.partitioner.default import murmur2

from dmrstream.contracts import Click, Codec, Impression, Sample, encode
from dmrstream.settings import load_settings
from featurestore import open_partition_store
from streamer.app import Streamer, producer_options
from streamer.processor import Record

T0 = 1_700_000_000_000
W = 5_000
PARTITIONS = 2


class ScriptedProducer:
    """Stands in for AIOKafkaProducer's batch API (``partitions_for``, ``create_batch``,
    ``send_batch``). Acknowledged records are kept in ``acked``; ``fail_sends`` makes that many
    upcoming batches fail as the broker would (their future gets the error), and ``refuse_next``
    makes the next ``send_batch`` call itself raise."""

    def __init__(self, batch_records: int = 7):
        self.batch_records = batch_records  # small, so that batches fill up and several go out
        self.acked: list[tuple[str, int, bytes | None, bytes]] = []
        self.fail_sends = 0
        self.refuse_next = False

    async def partitions_for(self, topic):
        return set(range(PARTITIONS))

    def create_batch(self):
        return _Batch(self.batch_records)

    async def send_batch(self, batch, topic, *, partition):
        if self.refuse_next:
            self.refuse_next = False
            raise KafkaTimeoutError()
        fut = asyncio.get_running_loop().create_future()
        if self.fail_sends:
            self.fail_sends -= 1
            asyncio.get_running_loop().call_later(0.01, fut.set_exception, RequestTimedOutError())
        else:
            self.acked += [(topic, partition, k, v) for k, v in batch.records]
            asyncio.get_running_loop().call_later(0.01, fut.set_result, None)
        return fut


class _Batch:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, *, key, value, timestamp):
        if self.records and len(self.records) >= self.capacity:  # an empty batch takes any record
            return None
        self.records.append((key, value))
        return object()


def _settings(tmp_path, name):
    return load_settings(overrides={"join.attribution_window_ms": W, "topics.prefix": "d.",
                                    "topics.partitions": PARTITIONS, "state_dir": str(tmp_path / name)})


def _batches(n_batches: int = 4, per_batch: int = 60) -> list[list[Record]]:
    """Impressions and clicks of 12 users over both partitions, in event-time order; clicks
    0.2-2 s after a third of the impressions; one undecodable impression (a dead letter)."""
    rng = random.Random(5)
    records, offsets = [], {}

    def add(topic, user, raw):
        part = user % PARTITIONS
        off = offsets[(topic, part)] = offsets.get((topic, part), -1) + 1
        records.append((topic, part, off, str(user).encode(), raw))

    for k in range(n_batches * per_batch):
        user, item, ts = rng.randrange(12), rng.randrange(30), T0 + k * 300
        add("d.impressions", user, encode(Impression(event_id=f"i{k}", user_id=user, item_id=item,
                                                     category_id=item % 4, ts=ts, request_id=f"r{k}")))
        if rng.random() < 0.33:
            add("d.clicks", user, encode(Click(event_id=f"c{k}", user_id=user, item_id=item, category_id=item % 4,
                                               ts=ts + rng.randrange(200, 2_000), request_id=f"r{k}")))
    add("d.impressions", 3, b"\xff not an impression")
    out = [Record(*r) for r in records]
    size = len(out) // n_batches + 1
    return [out[i:i + size] for i in range(0, len(out), size)]


def _run(settings, producer, script, pipelined: bool = False) -> tuple[Streamer, list[int], list[int]]:
    """Feed the batches through a Streamer, serially (``handle``) or pipelined (``submit``: a
    batch is finished when the next is submitted, the last by ``flush``); ``script(i, producer)``
    arms failures before batch i. Returns the streamer, the partitions opened, and the batches
    finished (their ``on_done`` calls), in order."""
    opened: list[int] = []
    done: list[int] = []

    def open_store(p):
        opened.append(p)
        return open_partition_store(settings, p)

    streamer = Streamer(settings, open_store, producer)

    async def go():
        for i, batch in enumerate(_batches()):
            script(i, producer)
            if pipelined:
                await streamer.submit(batch, on_done=lambda i=i: done.append(i))
                # One batch stays in flight: everything before it is finished, in order.
                assert streamer.in_flight and done == list(range(i))
            else:
                await streamer.handle(batch)
                done.append(i)
        await streamer.flush()
        assert not streamer.in_flight

    asyncio.run(go())
    return streamer, opened, done


def _copies(acked) -> dict[str, list[Sample]]:
    """Sample id -> every acknowledged copy of it (at-least-once: a failed attempt may have got
    some of its batches through before the redo sends them again)."""
    codec, out = Codec(Sample), {}
    for topic, _, _, value in acked:
        if topic == "d.samples":
            smp = codec.decode(value)
            out.setdefault(smp.sample_id, []).append(smp)
    return out


def _without_counters(smp: Sample) -> Sample:
    return msgspec.structs.replace(smp, counters=None)


def _fail_twice(i, producer):
    if i == 1:
        producer.fail_sends = 1  # one batch of batch 1 is lost, the others are acknowledged
    if i == 2:
        producer.refuse_next = True  # batch 2 cannot even be queued at first


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same batches through a clean delivery and through one that fails twice."""
    tmp = tmp_path_factory.mktemp("delivery")
    clean, _, _ = _run(_settings(tmp, "clean"), ScriptedProducer(), lambda i, p: None)
    faulty, opened, _ = _run(_settings(tmp, "faulty"), ScriptedProducer(), _fail_twice)
    clean.close()
    faulty.close()
    return clean, faulty, opened


def test_failed_delivery_is_not_committed_and_is_redone(runs):
    clean, faulty, opened = runs
    reference = {sid: copies[0] for sid, copies in _copies(clean.producer.acked).items()}
    assert len(reference) > 100 and clean.samples_out == len(reference)
    assert any(t == "d.dead-letters" for t, _, _, _ in clean.producer.acked)
    # Keyed records go where kafka-python's producer (and Java's) put them: murmur2 of the key.
    assert all(part == (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
               for _, part, key, _ in clean.producer.acked if key is not None)
    # A failed delivery sends the same messages again: nothing is reprocessed or reopened.
    assert sorted(opened) == list(range(PARTITIONS))
    assert faulty.samples_out == clean.samples_out  # counted once, for the attempt committed
    # Every copy has the reference's id, label, history (and, below, counters).
    got = _copies(faulty.producer.acked)
    assert set(got) == set(reference)
    assert any(len(copies) > 1 for copies in got.values())  # the partly acknowledged attempt
    for sid, copies in got.items():
        assert all(_without_counters(c) == _without_counters(reference[sid]) for c in copies), sid


def test_redone_samples_have_the_counters_of_the_first_attempt(runs):
    """A batch sent again carries the counters of its first processing."""
    clean, faulty, _ = runs
    reference = {sid: copies[0] for sid, copies in _copies(clean.producer.acked).items()}
    for sid, copies in _copies(faulty.producer.acked).items():
        assert all(c.counters == reference[sid].counters for c in copies), sid


def test_producer_authenticates_as_the_faust_clients():
    s = load_settings(overrides={"kafka.bootstrap_servers": "a:9093,b:9093", "kafka.security_protocol": "SASL_SSL",
                                 "kafka.sasl_mechanism": "SCRAM-SHA-256", "kafka.sasl_plain_username": "u",
                                 "kafka.sasl_plain_password": "p"})
    o = producer_options(s)
    assert o["bootstrap_servers"] == ["a:9093", "b:9093"]
    assert (o["security_protocol"], o["sasl_mechanism"], o["sasl_plain_username"], o["sasl_plain_password"]) == \
        ("SASL_SSL", "SCRAM-SHA-256", "u", "p")
    assert o["ssl_context"] is not None
    assert (o["acks"], o["enable_idempotence"]) == ("all", False)


def test_remembered_key_partitions_follow_partition_changes_and_unkeyed_records_stay_random(tmp_path):
    """Streamer._start_sends remembers murmur2's partition per key: forgotten when the topic's
    partitions change; a record without a key is spread at random every time, never pinned."""
    streamer = Streamer(_settings(tmp_path, "cache"), lambda p: None, ScriptedProducer(batch_records=1000))
    producer = streamer.producer

    async def send(messages):
        producer.acked.clear()
        await asyncio.gather(*await streamer._start_sends(messages))
        return [part for _, part, _, _ in producer.acked]

    keys = [str(u).encode() for u in range(50)]
    expected = [(murmur2(k) & 0x7FFFFFFF) % PARTITIONS for k in keys]
    for _ in range(2):  # computed, then remembered
        assert sorted(asyncio.run(send([("d.samples", k, b"v") for k in keys]))) == sorted(expected)
    assert len(streamer._key_partitions["d.samples"]) == 50
    unkeyed = asyncio.run(send([("d.dead-letters", None, b"v")] * 200))
    assert set(unkeyed) == set(range(PARTITIONS)) and streamer._key_partitions["d.dead-letters"] == {}
    cache = streamer._partition_cache({"d.samples": [0, 1, 2]})  # the topic grew a partition
    assert cache["d.samples"] == {}


@pytest.mark.parametrize("script", [lambda i, p: None, _fail_twice], ids=["clean", "failing"])
def test_pipelined_submit_gives_the_samples_of_serial_handling(runs, tmp_path, script):
    """Batch i+1 is processed while batch i's acks are awaited. A failure of batch 1's sends is
    seen only after batch 2 was processed on top of batch 1's in-memory state: batch 1's messages
    are sent again and its state persisted before batch 2's; batch 2's send refused at once is
    sent again when it is finished. Either way the samples (ids, labels, histories, counters)
    are those of the serial clean run, and no partition is reopened."""
    clean, _, _ = runs
    reference = {sid: copies[0] for sid, copies in _copies(clean.producer.acked).items()}
    piped, opened, done = _run(_settings(tmp_path, "piped"), ScriptedProducer(), script, pipelined=True)
    piped.close()
    assert done == [0, 1, 2, 3]  # every batch finished once, in order
    assert piped.samples_out == clean.samples_out and piped.events_in == clean.events_in
    got = _copies(piped.producer.acked)
    assert set(got) == set(reference)
    for sid, copies in got.items():
        assert all(c == reference[sid] for c in copies), sid
    assert sorted(opened) == list(range(PARTITIONS))
    if script is _fail_twice:
        assert any(len(copies) > 1 for copies in got.values())  # sent again after partial delivery


def test_an_interrupted_finish_drops_the_in_memory_joins(tmp_path):
    """If finishing a batch is interrupted (the loop's task cancelled as the worker stops), no
    later batch may persist its state on top: the partitions are released (reopened from the
    store when used again) and nothing is left in flight."""
    settings = _settings(tmp_path, "cancel")
    streamer = Streamer(settings, lambda p: open_partition_store(settings, p), ScriptedProducer())
    first, second = _batches()[:2]

    async def go():
        await streamer.submit(first)
        task = asyncio.ensure_future(streamer.submit(second))
        await asyncio.sleep(0)  # inside _finish of the first, awaiting its acks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert not streamer.in_flight and streamer.processors == {} and streamer.samples_out == 0
