"""The streamer on the local broker: 2 workers on 4 partitions, one SIGKILLed mid-stream and
restarted, gives the same sample ids and labels as a single worker, and its feature store equals
the reference sequences computed from the event log."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
from kafka import TopicPartition

from dmrstream.contracts import Click, Codec, Impression, Sample, encode
from dmrstream.kafkaio import create_topics, make_admin, make_consumer, make_producer
from dmrstream.settings import load_settings
from pipeline_reference import partition_of, reference_sequences, store_mismatches, watermarks

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000
W = 60_000
N_IMPRESSIONS = 3_000


def event_log(seed: int = 11):
    """A small simulated stream: users with favourite items, clicks 0.5-5 s after impressions."""
    rng = random.Random(seed)
    events: list[Impression | Click] = []
    for k in range(N_IMPRESSIONS):
        user = rng.randrange(60)
        item = (user * 7 + rng.randrange(6)) % 150 if rng.random() < 0.6 else rng.randrange(150)
        ts = T0 + k * 250 + rng.randrange(100)
        events.append(Impression(event_id=f"i{k}", user_id=user, item_id=item, category_id=item % 9, ts=ts,
                                 request_id=f"r{k}"))
        if rng.random() < 0.35:
            events.append(Click(event_id=f"c{k}", user_id=user, item_id=item, category_id=item % 9,
                                ts=ts + rng.randrange(500, 5_000), request_id=f"r{k}"))
    return sorted(events, key=lambda e: e.ts)


def _settings(broker, tmp_path, name):
    return load_settings(overrides={
        "kafka.bootstrap_servers": broker.bootstrap, "kafka.session_timeout_ms": 6000,
        "topics.prefix": f"{name}{uuid.uuid4().hex[:6]}.", "topics.partitions": 4,
        "join.attribution_window_ms": W, "state_dir": str(tmp_path / name), "metrics.streamer_port": 0,
    })


def _worker(s) -> subprocess.Popen:
    args = [sys.executable, "-m", "dmrstream", "--bootstrap", s.kafka.bootstrap_servers,
            "--set", f"topics.prefix={s.topics.prefix}", "--set", "topics.partitions=4",
            "--set", f"join.attribution_window_ms={W}", "--set", "kafka.session_timeout_ms=6000",
            "--set", f"state_dir={s.state_dir}", "--log-level", "WARNING",
            "streamer", "--metrics-port", "0"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())


def _produce(s, events):
    p = make_producer(s)
    for e in events:
        topic = s.topics.name("impressions" if isinstance(e, Impression) else "clicks")
        p.send(topic, key=str(e.user_id).encode(), value=encode(e))
    p.flush()
    p.close()


class SampleReader:
    def __init__(self, s):
        self.c = make_consumer(s, None, [])
        self.c.assign([TopicPartition(s.topics.name("samples"), p) for p in range(4)])
        self.c.seek_to_beginning()
        self.codec = Codec(Sample)
        self.labels: dict[str, int] = {}
        self.total = 0

    def read(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for records in self.c.poll(200).values():
                for r in records:
                    smp = self.codec.decode(r.value)
                    assert self.labels.setdefault(smp.sample_id, smp.label) == smp.label  # a repeat never flips
                    self.total += 1

    def until_stable(self, want_at_least: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last, still = -1, 0
        while time.monotonic() < deadline:
            self.read(1.0)
            n = len(self.labels)
            still = still + 1 if n == last and n >= want_at_least else 0
            if still >= 4:
                return
            last = n
        raise AssertionError(f"samples stuck at {len(self.labels)} (< {want_at_least})")


def _input_partitions(s) -> list[TopicPartition]:
    return [TopicPartition(s.topics.name(n), p) for n in ("impressions", "clicks") for p in range(4)]


def _committed(s) -> dict[TopicPartition, int | None]:
    admin = make_admin(s)
    try:
        group = f"{s.topics.prefix}streamer"
        got = admin.list_group_offsets({group: _input_partitions(s)})[group]
    finally:
        admin.close()
    return {tp: (m.offset if m is not None and m.offset >= 0 else None) for tp, m in got.items()}


def _next_offsets(s) -> dict[TopicPartition, int | None]:
    """One past the last record's offset of each input partition (None: empty), read back."""
    c = make_consumer(s, None, [])
    tps = _input_partitions(s)
    c.assign(tps)
    c.seek_to_beginning()
    last: dict[TopicPartition, int | None] = dict.fromkeys(tps)
    deadline, idle = time.monotonic() + 30, 0
    while time.monotonic() < deadline and idle < 3:
        polled = c.poll(500)
        idle = 0 if polled else idle + 1
        for tp, records in polled.items():
            last[tp] = records[-1].offset + 1
    c.close()
    return last


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_two_workers_with_a_sigkill_equal_one_worker(broker, tmp_path):
    events = event_log()
    impressions = [e for e in events if isinstance(e, Impression)]
    # Samples exist for impressions whose window closed before the last event time on both inputs.
    last_click = max(e.ts for e in events if isinstance(e, Click))
    want = sum(1 for e in impressions if e.ts + W < last_click - 60_000)

    single = _settings(broker, tmp_path, "one")
    create_topics(single)
    _produce(single, events)
    w = _worker(single)
    try:
        ref = SampleReader(single)
        ref.until_stable(want)
    finally:
        _stop(w)
    # Every input record was acked, so the streamer's group committed past each partition's last
    # record (faust commits from the acks the batch loop gives it).
    ends = _next_offsets(single)
    assert all(end is not None for end in ends.values()), ends  # every input partition holds records
    assert _committed(single) == ends

    multi = _settings(broker, tmp_path, "two")
    create_topics(multi)
    a, b = _worker(multi), _worker(multi)
    try:
        reader = SampleReader(multi)
        half = len(events) // 2
        _produce(multi, events[:half])
        deadline = time.monotonic() + 90  # both joined and working through the first half
        while not reader.labels and time.monotonic() < deadline:
            reader.read(1.0)
        assert reader.labels, "no sample from the first half"
        reader.read(3.0)
        a.kill()  # SIGKILL mid-stream
        a.wait()
        _produce(multi, events[half:])
        reader.read(3.0)
        a = _worker(multi)  # restart it
        reader.until_stable(want)
    finally:
        _stop(a, b)

    # Every impression whose window closed before the end of both inputs is settled: both runs
    # must have emitted exactly those, with the same labels. The last window of the stream stays
    # pending (or not, if one input went idle first) in a live stream, so it is only required to
    # agree where both runs emitted it.
    # Per partition, events are released in time order up to the merge watermark; the join's
    # watermark is then the min over the inputs of the highest *released* ts.
    merge_wm, join_wm = watermarks(events, 4)
    settled = {e.event_id for e in impressions if e.ts + W < join_wm[partition_of(e.user_id, 4)] - 5_000}
    assert settled <= set(reader.labels) and settled <= set(ref.labels)  # none missing
    assert set(reader.labels) <= {e.event_id for e in impressions}  # nothing invented
    common = set(reader.labels) & set(ref.labels)
    assert len(common) >= len(settled)
    assert {k: reader.labels[k] for k in common} == {k: ref.labels[k] for k in common}  # identical labels
    assert sum(ref.labels.values()) > 0.2 * len(ref.labels)

    # The store holds what the merge released (events past the merge watermark still wait in it).
    expected = reference_sequences([e for e in events if e.ts <= merge_wm[partition_of(e.user_id, 4)]],
                                   multi.features.seq_len)
    assert store_mismatches(multi, expected) == []
