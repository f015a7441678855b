"""Streamer benchmark (not a test): events/s of one faust worker through decode + label join +
feature store (RocksDB) + samples produced, on the local broker, and the processing latency of
an event (batch received to its samples acknowledged by the broker; the attribution-window wait
is excluded). Baselines in the same run: a plain kafka-python consumer reading the same topics,
the same processing with no Kafka (just before and just after the worker), and the "faust
floor": a faust app configured as the streamer's whose loop takes the same batches the same way
(whole fetches, streamer/faust_batches.py) and does nothing with them; also faust's
per-message stream path (an agent's take_events) with the eager hand-over of
streamer/faust_transport.py and with faust's own.

The stream is produced before the worker starts: the worker consumes a backlog, which arrives
in one fetch (the time from the partitions' assignment to the first batch in hand is shown on
its own: the broker's time, the worker's thread is idle). The worker runs faust's path and the
processing on one event-loop thread: the bench shows how busy that thread is. Every loop is
timed from the end of its first batch to the end of its last, less the stream's end (see
:class:`BatchClock`).

    .venv/bin/python bench/streamer.py [impressions]

The machine is shared (2 cores; the broker, the producer and the worker compete): noisy figures.
"""

from __future__ import annotations

import asyncio
import gc
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
from streamer.app import create_app, faust_app, fetch_buffer_size, tune_gc  # noqa: E402
from streamer.faust_batches import FetchBatches  # noqa: E402

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


def processor_alone(settings, stream: list, fetch_order: bool = True) -> float:
    """Events/s of the same processing (decode, merge, join, RocksDB store, samples) with no
    Kafka, batched as the worker batches: ``streamer.batch_max_events`` messages at a time, split
    over the partitions' processors and stores (the producer's murmur2 partition of each key).

    ``fetch_order``: the messages in the order the backlog reaches the worker (it is one fetch
    of whole partitions, the impressions first: the merge holds them until the clicks come and
    then releases each partition's stream at once): the ceiling the worker's Kafka and faust
    machinery leaves room for. Else in the stream's order, as a live stream's small fetches
    interleave both inputs: batches of a few events per user, a costlier shape."""
    from aiokafka.partitioner import DefaultPartitioner

    from featurestore import open_partition_store
    from streamer.processor import PartitionProcessor, Record

    n_parts = settings.topics.partitions
    parts, partition_of = list(range(n_parts)), DefaultPartitioner()
    procs = [PartitionProcessor(p, open_partition_store(settings, p), settings) for p in parts]
    records = [Record(topic, partition_of(key, parts, parts), i, key, value)
               for i, (topic, key, value) in enumerate(stream)]
    if fetch_order:
        impressions = settings.topics.name("impressions")
        records.sort(key=lambda r: (r.topic != impressions, r.partition))  # stable: offsets kept
    batch = settings.streamer.batch_max_events
    t = time.perf_counter()
    for i in range(0, len(records), batch):
        by_partition: dict[int, list] = {}
        for r in records[i:i + batch]:
            by_partition.setdefault(r.partition, []).append(r)
        results = [(procs[p], procs[p].process(recs)) for p, recs in by_partition.items()]
        for proc, result in results:
            proc.commit(result)
    took = time.perf_counter() - t
    for proc in procs:
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


def run_until(app, counted, total: int) -> None:
    """Run ``app`` in a faust worker until ``counted()`` reaches ``total`` (4 minutes at most)."""
    worker = faust.Worker(app, loglevel="error", quiet=True)

    @app.task
    async def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and counted() < total:
            await asyncio.sleep(0.05)
        await worker.stop()

    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass
    # The worker closed its event loop: a later app in this process needs a new one.
    asyncio.set_event_loop(asyncio.new_event_loop())


class BatchClock:
    """Times a run of batches from the end of the first to the end of the last: every batch
    counted is timed whole, faust collecting it included (the first's collection overlaps the
    start-up and the group join). Called on the event loop's thread, it also tells how busy
    that thread was meanwhile (its CPU time over the wall time).

    The bench's stream is finite: its last batch is partial, and its take waited out
    ``streamer.batch_within_ms`` (250 ms, ~7 % of a default run) for messages that never came.
    That wait is not processing, so it is left out: for a loop that works on its batches (the
    worker, ``drop_last=False``), the time from the end of the batch before to the start of the
    last (:meth:`batch_started`), which is all take's wait (the last batch's work still counts:
    most of it is events the merge held back from earlier batches); for an empty loop (the
    floors, ``drop_last=True``), the last batch whole, its events and its time."""

    def __init__(self, full: int, drop_last: bool):
        self.full, self.drop_last = full, drop_last
        self.first = self.cpu_first = self._started = 0.0
        self.after_first = 0  # events in the batches after the first
        # The last two batches after the first: (end, CPU, after_first, started, events).
        self._ends: list[tuple[float, float, int, float, int]] = []

    def batch_started(self) -> None:
        """The batch's records are in hand (its take returned)."""
        self._started = time.perf_counter()

    def batch_done(self, events: int) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if not self.first:
            self.first, self.cpu_first = now, cpu
            return
        self.after_first += events
        self._ends = [*self._ends[-1:], (now, cpu, self.after_first, self._started or now, events)]

    def _window(self) -> tuple[float, float, int, float] | None:
        """(wall s, CPU s, events, wall s left out) of the timed run."""
        if not self._ends:
            return None
        end, cpu, counted, started, events = self._ends[-1]
        left_out = 0.0
        if len(self._ends) == 2 and events < self.full:  # the stream's last batch, partial
            prev_end, prev_cpu, prev_counted = self._ends[0][:3]
            if self.drop_last:
                left_out = end - prev_end
                end, cpu, counted = prev_end, prev_cpu, prev_counted
            else:
                left_out = max(0.0, started - prev_end)
        wall = end - self.first - (0.0 if self.drop_last else left_out)
        return wall, cpu - self.cpu_first, counted, left_out

    def events_per_s(self) -> float:
        w = self._window()
        return w[2] / w[0] if w else float("nan")

    def loop_busy(self) -> float:
        w = self._window()
        return w[1] / w[0] if w else float("nan")

    def left_out_s(self) -> float:
        """Wall seconds of the stream's end left out of the run (see the class docstring)."""
        w = self._window()
        return w[3] if w else 0.0


def run_worker(settings, total: int) -> dict:
    app = create_app(settings)
    streamer = app.streamer
    clock = BatchClock(settings.streamer.batch_max_events, drop_last=False)
    submit = streamer.submit
    assigned_at: list[float] = []  # when the group gave the worker its partitions
    first_records_s: list[float] = []  # from then to the first batch in hand

    @app.on_partitions_assigned.connect
    async def on_assigned(app_, assigned, **kwargs):
        if assigned and not assigned_at:
            assigned_at.append(time.perf_counter())

    async def timed(records, on_done=lambda: None):
        clock.batch_started()
        if assigned_at and not first_records_s:
            first_records_s.append(time.perf_counter() - assigned_at[0])

        def done():
            on_done()
            clock.batch_done(len(records))
        await submit(records, done)

    streamer.submit = timed  # the batch loop looks it up per batch
    run_until(app, lambda: streamer.events_in, total)
    streamer.close()
    times = np.array([t for t, _ in streamer.batch_times])
    sizes = np.array([n for _, n in streamer.batch_times])
    per_event = np.repeat(times, sizes)  # every event in a batch waits for the whole batch
    return {"events": streamer.events_in, "samples": streamer.samples_out, "events_per_s": clock.events_per_s(),
            "loop_busy": clock.loop_busy(), "tail_wait_ms": clock.left_out_s() * 1e3,
            "first_records_ms": first_records_s[0] * 1e3 if first_records_s else float("nan"),
            "p50_ms": float(np.percentile(per_event, 50) * 1e3), "p99_ms": float(np.percentile(per_event, 99) * 1e3),
            "mean_batch": float(sizes.mean())}


def faust_floor(settings, total: int, hand_over: str = "fetches", name: str = "floor") -> float:
    """Events/s of a faust app configured as the streamer's (its own consumer group, so from the
    beginning) whose loop takes the same batches and does nothing with them: faust's path
    alone, timed as the worker is. ``hand_over``: "fetches", the streamer's (whole fetches, see
    streamer/faust_batches.py); "eager", an agent's ``take_events`` over faust's per-message
    stream path with the eager hand-over of streamer/faust_transport.py; "stock", the same with
    faust's own per-message hand-over."""
    app = faust_app(settings, name, eager_hand_over=hand_over != "stock")
    inputs = app.topic(settings.topics.name("impressions"), settings.topics.name("clicks"),
                       key_serializer="raw", value_serializer="raw")
    clock = BatchClock(settings.streamer.batch_max_events, drop_last=True)
    seen = [0]
    batch_max, within_s = settings.streamer.batch_max_events, settings.streamer.batch_within_ms / 1000

    if hand_over == "fetches":
        batches = FetchBatches(app, [inputs], max_buffered=fetch_buffer_size(settings))

        @app.task
        async def empty_loop():
            while True:
                messages = await batches.take(batch_max, within_s)
                seen[0] += len(messages)
                clock.batch_done(len(messages))
                batches.ack(messages)
    else:
        @app.agent(inputs, name="empty")
        async def empty(stream):
            async for events in stream.take_events(batch_max, within=within_s):
                seen[0] += len(events)
                clock.batch_done(len(events))

    run_until(app, lambda: seen[0], total)
    return clock.events_per_s()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    tune_gc()  # as run_worker does in a worker process; for every figure of this run alike
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
        floor = faust_floor(s, total)
        eager_floor = faust_floor(s, total, hand_over="eager", name="floor-eager")
        stock_floor = faust_floor(s, total, hand_over="stock", name="floor-stock")
        # The processing alone just before and just after the worker: the host's speed drifts
        # within a run, so the worker is compared with the mean of the two around it.
        alone_before = processor_alone(s.model_copy(update={"state_dir": f"{state}/alone-before"}), stream)
        w = run_worker(s, total)
        alone_after = processor_alone(s.model_copy(update={"state_dir": f"{state}/alone"}), stream)
        alone = (alone_before + alone_after) / 2
        tuned = gc.get_threshold()
        gc.set_threshold(700, 10, 10)  # CPython's defaults: what the worker's GC_THRESHOLDS save
        alone_default_gc = processor_alone(s.model_copy(update={"state_dir": f"{state}/alone-gc"}), stream)
        gc.set_threshold(*tuned)
        interleaved = processor_alone(s.model_copy(update={"state_dir": f"{state}/alone-live"}), stream,
                                      fetch_order=False)
    eps = w["events_per_s"]
    table = Table(title=f"streamer: one faust worker, {total:,} events, 4 partitions, local broker")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("events/s through join + store + samples", f"{eps:,.0f}"),
        ("raw kafka-python consume events/s (baseline)", f"{raw:,.0f}"),
        ("worker / raw consume", f"{eps / raw:.2f}"),
        ("faust floor: empty loop, whole fetches (the streamer's path; the backlog is one fetch, "
         "so this is the hand-over alone) events/s", f"{floor:,.0f}"),
        ("  the worker's first batch in hand after its partitions' assignment: the backlog's fetch (ms)",
         f"{w['first_records_ms']:,.0f}"),
        ("  faust's per-message stream path, eager hand-over (take_events)", f"{eager_floor:,.0f}"),
        ("  the same with faust's own per-message hand-over", f"{stock_floor:,.0f}"),
        ("same processing alone, no Kafka, the backlog's order, same batches and partitions (events/s)", f"{alone:,.0f}"),
        ("  just before / just after the worker (their mean above)", f"{alone_before:,.0f} / {alone_after:,.0f}"),
        ("worker / processing alone", f"{eps / alone:.2f}"),
        ("  processing alone with CPython's default GC thresholds", f"{alone_default_gc:,.0f}"),
        ("processing alone, the stream's order (a live stream's interleaved batches) events/s", f"{interleaved:,.0f}"),
        ("  a live stream's worker, estimated: that x (worker / processing alone)", f"{interleaved * eps / alone:,.0f}"),
        ("worker's event-loop thread busy (CPU / wall)", f"{w['loop_busy']:.0%}"),
        ("stream's end left out: the last take's wait (ms)", f"{w['tail_wait_ms']:,.0f}"),
        ("samples produced", f"{w['samples']:,}"),
        ("processing latency p50 (ms)", f"{w['p50_ms']:.1f}"),
        ("processing latency p99 (ms)", f"{w['p99_ms']:.1f}"),
        ("mean batch (events)", f"{w['mean_batch']:.0f}"),
        ("batch bound (streamer.batch_max_events)", f"{s.streamer.batch_max_events:,}"),
        ("produce events/s (setup)", f"{total / produce_s:,.0f}"),
    ]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    print(json.dumps({"streamer_events_per_s": round(eps), "raw_consume_events_per_s": round(raw),
                      "streamer_vs_raw_ratio": round(eps / raw, 3),
                      "faust_floor_events_per_s": round(floor),
                      "faust_eager_floor_events_per_s": round(eager_floor),
                      "faust_stock_floor_events_per_s": round(stock_floor),
                      "processor_alone_events_per_s": round(alone),
                      "processor_alone_before_events_per_s": round(alone_before),
                      "processor_alone_after_events_per_s": round(alone_after),
                      "processor_alone_default_gc_events_per_s": round(alone_default_gc),
                      "processor_alone_stream_order_events_per_s": round(interleaved),
                      "live_stream_worker_estimate_events_per_s": round(interleaved * eps / alone), "streamer_vs_alone_ratio": round(eps / alone, 3),
                      "loop_busy_fraction": round(w["loop_busy"], 3),
                      "tail_wait_ms": round(w["tail_wait_ms"], 1),
                      "first_records_after_assignment_ms": round(w["first_records_ms"], 1),
                      "samples": w["samples"], "batch_max_events": s.streamer.batch_max_events,
                      "latency_p50_ms": round(w["p50_ms"], 2), "latency_p99_ms": round(w["p99_ms"], 2)}))


if __name__ == "__main__":
    main()
