"""Streamer benchmark (not a test): events/s of one faust worker through decode + label join +
feature store (RocksDB) + samples produced, on the local broker, and the processing latency of
an event (batch received to its samples acknowledged by the broker; the attribution-window wait
is excluded). Baseline in the same run: a plain kafka-python consumer reading the same topics.

    .venv/bin/python bench/streamer.py [events]

The machine is shared (2 cores; the broker, the producer and the worker compete): noisy figures.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faust  # noqa: E402
from kafka import TopicPartition  # noqa: E402

from dmrstream.broker import LocalBroker  # noqa: E402
from dmrstream.contracts import Click, Impression, encode  # noqa: E402
from dmrstream.kafkaio import create_topics, make_consumer, make_producer  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from streamer.app import create_app  # noqa: E402

T0 = 1_700_000_000_000


def make_stream(settings, n_impressions: int) -> list:
    """(topic, key, value) of a stream of impressions (5,000 users, 20,000 items), 30 % clicked
    1-20 s later."""
    rng = random.Random(1)
    imp_t, clk_t = settings.topics.name("impressions"), settings.topics.name("clicks")
    out = []
    for k in range(n_impressions):
        user = rng.randrange(5_000)
        item = int(rng.paretovariate(1.2)) % 20_000
        ts = T0 + k * 20
        key = str(user).encode()
        out.append((imp_t, key, encode(Impression(event_id=f"i{k}", user_id=user, item_id=item,
                                                  category_id=item % 50, ts=ts, request_id=f"r{k}"))))
        if rng.random() < 0.3:
            out.append((clk_t, key, encode(Click(event_id=f"c{k}", user_id=user, item_id=item,
                                                 category_id=item % 50, ts=ts + rng.randrange(1_000, 20_000),
                                                 request_id=f"r{k}"))))
    return out


def produce(settings, stream: list) -> int:
    p = make_producer(settings)
    for topic, key, value in stream:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()
    return len(stream)


def processor_alone(settings, stream: list) -> float:
    """Events/s of the same processing (decode, merge, join, RocksDB store, samples) on one
    partition with no Kafka: the ceiling the worker's Kafka and faust machinery leaves room for."""
    from featurestore import open_partition_store
    from streamer.processor import PartitionProcessor, Record

    proc = PartitionProcessor(0, open_partition_store(settings, 0), settings)
    records = [Record(topic, 0, i, key, value) for i, (topic, key, value) in enumerate(stream)]
    t = time.perf_counter()
    for i in range(0, len(records), 2000):
        proc.commit(proc.process(records[i:i + 2000]))
    took = time.perf_counter() - t
    proc.store.close()
    return len(records) / took


def raw_consume(settings, total: int) -> float:
    """Events/s of a bare consumer over the same topics (the ceiling for any consumer here)."""
    c = make_consumer(settings, None, [])
    c.assign([TopicPartition(settings.topics.name(t), p) for t in ("impressions", "clicks")
              for p in range(settings.topics.partitions)])
    c.seek_to_beginning()
    n, start = 0, time.perf_counter()
    while n < total and time.perf_counter() - start < 120:
        for records in c.poll(500, max_records=5000).values():
            n += len(records)
    took = time.perf_counter() - start
    c.close()
    return n / took


def run_worker(settings, total: int) -> dict:
    app = create_app(settings)
    worker = faust.Worker(app, loglevel="error", quiet=True)
    streamer = app.streamer
    marks: dict[str, float] = {}

    @app.task
    async def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if streamer.events_in and "first" not in marks:
                marks["first"] = time.perf_counter() - sum(t for t, _ in streamer.batch_times)
            if streamer.events_in >= total:
                marks["last"] = time.perf_counter()
                break
        await worker.stop()

    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass
    streamer.close()
    took = marks.get("last", time.perf_counter()) - marks.get("first", 0.0)
    times = np.array([t for t, _ in streamer.batch_times])
    sizes = np.array([n for _, n in streamer.batch_times])
    per_event = np.repeat(times, sizes)  # every event in a batch waits for the whole batch
    return {"events": streamer.events_in, "samples": streamer.samples_out, "seconds": took,
            "p50_ms": float(np.percentile(per_event, 50) * 1e3), "p99_ms": float(np.percentile(per_event, 99) * 1e3),
            "mean_batch": float(sizes.mean())}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    console = Console()
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as state:
        s = load_settings(overrides={"kafka.bootstrap_servers": broker.bootstrap, "kafka.session_timeout_ms": 6000,
                                     "topics.prefix": "bench.", "topics.partitions": 4, "state_dir": state,
                                     "join.attribution_window_ms": 60_000,
                                     "metrics.streamer_port": 0})
        create_topics(s)
        stream = make_stream(s, n)
        t = time.perf_counter()
        total = produce(s, stream)
        produce_s = time.perf_counter() - t
        raw = raw_consume(s, total)
        w = run_worker(s, total)
        alone = processor_alone(s.model_copy(update={"state_dir": f"{state}/alone"}), stream)
    eps = w["events"] / w["seconds"]
    table = Table(title=f"streamer: one faust worker, {total:,} events, 4 partitions, local broker")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("events/s through join + store + samples", f"{eps:,.0f}"),
        ("raw kafka-python consume events/s (baseline)", f"{raw:,.0f}"),
        ("worker / raw consume", f"{eps / raw:.2f}"),
        ("same processing alone, no Kafka (events/s, 1 partition)", f"{alone:,.0f}"),
        ("worker / processing alone", f"{eps / alone:.2f}"),
        ("samples produced", f"{w['samples']:,}"),
        ("processing latency p50 (ms)", f"{w['p50_ms']:.1f}"),
        ("processing latency p99 (ms)", f"{w['p99_ms']:.1f}"),
        ("mean batch (events)", f"{w['mean_batch']:.0f}"),
        ("produce events/s (setup)", f"{total / produce_s:,.0f}"),
    ]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    print(json.dumps({"streamer_events_per_s": round(eps), "raw_consume_events_per_s": round(raw),
                      "streamer_vs_raw_ratio": round(eps / raw, 3),
                      "processor_alone_events_per_s": round(alone), "streamer_vs_alone_ratio": round(eps / alone, 3), "samples": w["samples"],
                      "latency_p50_ms": round(w["p50_ms"], 2), "latency_p99_ms": round(w["p99_ms"], 2)}))


if __name__ == "__main__":
    main()
