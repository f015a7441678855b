"""The faust-streaming app: consumes impressions and clicks (co-partitioned by user), keeps the
feature store, joins labels and produces samples and dead letters.

One feature store per partition (RocksDB via rocksdict) under ``state_dir``; a partition's store
is opened when the partition is assigned and closed when it is revoked, so state follows
partitions on rebalance. Several workers (processes with the same app id) share the partitions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Callable

import faust
from kafka.errors import KafkaError

from dmrstream.kafkaio import make_producer, wait_for_broker_at_start
from dmrstream.settings import Settings
from monitoring import metrics
from streamer.processor import BatchResult, PartitionProcessor, Record

log = logging.getLogger(__name__)

BATCH_MAX = 2000
BATCH_WITHIN_S = 0.25


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """faust/aiokafka connection options from the one settings object (SASL/SSL included)."""
    k = settings.kafka
    opts: dict[str, Any] = {
        "broker": ";".join(f"kafka://{h.strip()}" for h in k.bootstrap_servers.split(",")),
        "broker_session_timeout": k.session_timeout_ms / 1000,
        "broker_heartbeat_interval": k.heartbeat_interval_ms / 1000,
        "broker_request_timeout": max(k.request_timeout_ms / 1000, k.session_timeout_ms / 1000 + 5),
    }
    if k.security_protocol != "PLAINTEXT":
        import ssl

        ctx = None
        if k.security_protocol in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(cafile=k.ssl_cafile)
            if k.ssl_certfile:
                ctx.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
            ctx.check_hostname = k.ssl_check_hostname
        if k.sasl_mechanism:
            password = k.sasl_plain_password.get_secret_value() if k.sasl_plain_password else None
            opts["broker_credentials"] = faust.SASLCredentials(
                username=k.sasl_plain_username, password=password, ssl_context=ctx,
                mechanism=k.sasl_mechanism)
        elif ctx is not None:
            opts["broker_credentials"] = faust.SSLCredentials(ctx)
    return opts


class Streamer:
    """Owns the per-partition processors and the producer; the faust agent calls into it."""

    def __init__(self, settings: Settings, open_store: Callable[[int], Any]):
        self.settings = settings
        self.open_store = open_store
        self.processors: dict[int, PartitionProcessor] = {}
        self.producer = make_producer(settings)
        self.samples_out = 0
        self.events_in = 0
        # (seconds from batch received to its samples acknowledged, events in it): latency figures
        self.batch_times: deque[tuple[float, int]] = deque(maxlen=100_000)

    def processor(self, partition: int) -> PartitionProcessor:
        proc = self.processors.get(partition)
        if proc is None:
            proc = PartitionProcessor(partition, self.open_store(partition), self.settings)
            self.processors[partition] = proc
        return proc

    def release(self, partitions: set[int]) -> None:
        for p in partitions:
            proc = self.processors.pop(p, None)
            if proc is not None:
                close = getattr(proc.store, "close", None)
                if close:
                    close()

    async def handle(self, records: list[Record]) -> None:
        """Process a consumed batch partition by partition, produce everything it emits with one
        flush, and only then persist each partition's state (see ``streamer/processor.py``)."""
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            by_partition[r.partition].append(r)
        attempt = 0
        while True:
            try:
                started = time.perf_counter()
                procs = [(self.processor(p), recs) for p, recs in by_partition.items()]
                results = [(proc, proc.process(recs)) for proc, recs in procs]
                await self._deliver(results)
                took = time.perf_counter() - started
                metrics.BATCH_SECONDS.observe(took)
                self.batch_times.append((took, len(records)))
                self.events_in += len(records)
                return
            except (KafkaError, OSError) as e:
                # The joins ran ahead in memory: drop them, rebuild from what was persisted and
                # redo the batch (the stores ignore the repeats). Back off, never spin.
                attempt += 1
                log.warning("partitions %s: delivery failed (%s); retry %d", sorted(by_partition), e, attempt)
                self.release(set(by_partition))
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))

    async def tick(self) -> None:
        results = [(proc, proc.tick(self.settings.join.idle_input_s)) for proc in list(self.processors.values())]
        await self._deliver([(proc, r) for proc, r in results if r.messages or r.state_changes])

    async def _deliver(self, results: list[tuple[PartitionProcessor, BatchResult]]) -> None:
        futures = [self.producer.send(topic, key=key, value=value)
                   for _, result in results for topic, key, value in result.messages]
        if futures:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.producer.flush)
            for f in futures:
                f.get(timeout=0)  # raises if the broker refused: the batch is then redelivered
            out = Counter(topic for _, result in results for topic, _, _ in result.messages)
            for topic, n in out.items():
                metrics.EVENTS_OUT.labels("streamer", topic).inc(n)
        for proc, result in results:
            proc.commit(result)
            self.samples_out += result.samples

    def close(self) -> None:
        self.release(set(self.processors))
        self.producer.close(timeout=5)


def create_app(settings: Settings, open_store: Callable[[int], Any] | None = None) -> faust.App:
    """The faust app; ``open_store(partition)`` gives that partition's feature store."""
    if open_store is None:
        from featurestore import open_partition_store

        def open_store(partition: int):
            return open_partition_store(settings, partition)

    t = settings.topics
    Path(settings.state_dir, "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{t.prefix}streamer",
        store="memory://",  # faust's own tables are unused: state lives in the feature store
        topic_partitions=t.partitions,
        topic_allow_declare=False,  # `dmrstream topics create` owns topic layout
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        datadir=str(Path(settings.state_dir) / "faust"),
        **faust_broker_options(settings),
    )
    streamer = Streamer(settings, open_store)
    app.streamer = streamer  # for the CLI and tests
    inputs = app.topic(t.name("impressions"), t.name("clicks"), key_serializer="raw", value_serializer="raw")

    @app.agent(inputs, name="join")
    async def join(stream):
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            records = [Record(e.message.topic, e.message.partition, e.message.offset, e.message.key,
                              e.message.value) for e in events]
            await streamer.handle(records)

    @app.timer(interval=1.0)
    async def idle_inputs():
        await streamer.tick()

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs):
        streamer.release({tp.partition for tp in revoked})

    return app


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run one faust worker until SIGTERM/SIGINT. A broker that is not up yet is waited for first
    (see :func:`~dmrstream.kafkaio.wait_for_broker_at_start`); a signal during that wait returns."""
    metrics.serve_metrics(settings.metrics.streamer_port, settings.metrics.bind)
    # Before the faust Worker exists, so our own handlers: faust installs its own once it starts
    # (and the producer in create_app is the first Kafka client).
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ready = wait_for_broker_at_start(settings, stop, "streamer")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not ready or stop.is_set():
        return
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.streamer.close()
