"""The faust-streaming app: consumes impressions and clicks (co-partitioned by user), keeps the
feature store, joins labels and produces samples and dead letters.

One feature store per partition (RocksDB via rocksdict) under ``state_dir``; a partition's store
is opened when the partition is assigned and closed when it is revoked, so state follows
partitions on rebalance. Several workers (processes with the same app id) share the partitions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Callable

import faust
import mode
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from dmrstream.kafkaio import wait_for_broker_at_start
from dmrstream.settings import Settings
from monitoring import metrics
from streamer.faust_batches import FetchBatches
from streamer.faust_transport import EagerHandOverTransport
from streamer.processor import BatchResult, PartitionProcessor, Record

log = logging.getLogger(__name__)

BATCH_MAX = 2000
BATCH_WITHIN_S = 0.25
# What a failed delivery raises: aiokafka (a batch not acknowledged within the request timeout,
# no metadata, a closed producer...) or the socket layer. asyncio.TimeoutError is TimeoutError,
# an OSError, since Python 3.11.
DELIVERY_ERRORS = (KafkaError, OSError)
# Samples are compressed (network and broker bytes on a real cluster) on the event loop. zstd, not
# lz4: aiokafka's lz4 is level 9 (HC), ~10 % of the worker in a py-spy profile of bench/streamer.py;
# cramjam's zstd level 3 compresses sample JSON ~5x faster and smaller (145 vs 767 MB/s, ratio 11.0
# vs 13.4, one-off on 77 KB of samples). A/B of the worker in one process, 6 pairs: zstd ahead in 5, mean 15,342 vs 13,832
# events/s. kafka-python reads it with the ``zstandard`` package.
PRODUCER_COMPRESSION = "zstd"
PARTITION_CACHE_KEYS = 262_144  # keys whose output partition is remembered per topic (~40 MB at most)


# The worker allocates several container objects per event (decoded events, join records,
# sample columns) while holding many long-lived ones (pending impressions, record caches).
# CPython's default collector thresholds (700, 10, 10) then run a collection every few events
# and full ones over all those long-lived objects: ~20 % of the processing in bench/streamer.py
# (processing alone ~14,000 vs ~18,000 events/s). Cycles are still collected, every 50,000
# allocations instead of 700.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Set the streamer process's garbage-collector thresholds (see :data:`GC_THRESHOLDS`):
    :func:`run_worker` does, before the app starts."""
    gc.set_threshold(*GC_THRESHOLDS)


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


def producer_options(settings: Settings) -> dict[str, Any]:
    """The streamer's AIOKafkaProducer, configured as :func:`~dmrstream.kafkaio.make_producer`
    configures kafka-python's (every replica acknowledges, 256 KiB batches, compressed, the same
    request size limit, no idempotence: see make_producer) and authenticated exactly as the app's faust
    clients (the same credentials object, converted by faust's own helper). No linger: the
    streamer hands over complete batches. A batch the broker does not acknowledge is retried
    until the request timeout; then its future fails and the streamer redoes the batch."""
    opts = faust_broker_options(settings)
    return {
        "bootstrap_servers": settings.kafka.bootstrap_servers.split(","),
        "client_id": settings.kafka.client_id,
        **credentials_to_aiokafka_auth(opts.get("broker_credentials")),
        "acks": "all",
        "linger_ms": 0,
        "max_batch_size": 256 * 1024,
        "compression_type": PRODUCER_COMPRESSION,
        "max_request_size": max(1_048_576, settings.limits.max_message_bytes + 65_536),
        "request_timeout_ms": int(opts["broker_request_timeout"] * 1000),
        "enable_idempotence": False,
    }


class Streamer:
    """Owns the per-partition processors and the producer of samples and dead letters; the
    worker's batch loop and timer call into it.

    The producer is aiokafka's, used through its batch API: records are grouped per partition
    into batches built in C, one future per batch. The kafka-python producer it replaces built
    every record in Python and flushed in an executor thread fighting the event loop for the GIL;
    faust's own producer (aiokafka too) would cost a coroutine and a future per record, all on the
    event loop that also runs the consumer and the processing. It is a dedicated client, started
    by :meth:`start` in the worker's event loop before faust's consumer and stopped by
    :meth:`stop` after the batch loop (see :func:`create_app`); tests may pass their own."""

    def __init__(self, settings: Settings, open_store: Callable[[int], Any], producer: Any = None):
        self.settings = settings
        self.open_store = open_store
        self.processors: dict[int, PartitionProcessor] = {}
        self.producer = producer
        self._owns_producer = producer is None
        self._partitioner = DefaultPartitioner()  # murmur2 of the key, as Java and kafka-python
        self._partitions_seen: dict[str, list[int]] = {}
        self._key_partitions: dict[str, dict[bytes | None, int]] = {}
        # One batch or tick at a time from process to commit: the tick must not join on top of a
        # batch whose state is not persisted yet, nor persist its changes before that batch's.
        self._serial = asyncio.Lock()
        self.samples_out = 0
        self.events_in = 0
        # (seconds from batch received to its samples acknowledged, events in it): latency figures
        self.batch_times: deque[tuple[float, int]] = deque(maxlen=100_000)

    async def start(self) -> None:
        if self.producer is None:
            self.producer = AIOKafkaProducer(**producer_options(self.settings))
            await self.producer.start()

    async def stop(self) -> None:
        """Stop the producer this streamer started, once a batch or tick in progress is done."""
        async with self._serial:
            if self._owns_producer and self.producer is not None:
                producer, self.producer = self.producer, None
                await producer.stop()

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
        """Process a consumed batch partition by partition, produce everything it emits, wait for
        the broker's acks of all of it, and only then persist each partition's state (see
        ``streamer/processor.py``). Returns once the state is persisted: faust acks the batch's
        offsets after that. A record is anything with a :class:`Record`'s attributes (faust's
        consumer messages are passed as they are)."""
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            by_partition[r.partition].append(r)
        attempt = 0
        async with self._serial:
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
                except DELIVERY_ERRORS as e:
                    # The joins ran ahead in memory: drop them, rebuild from what was persisted and
                    # redo the batch (the stores ignore the repeats). Back off, never spin.
                    attempt += 1
                    log.warning("partitions %s: delivery failed (%r); retry %d", sorted(by_partition), e, attempt)
                    self.release(set(by_partition))
                    await asyncio.sleep(min(0.1 * 2**attempt, 5.0))

    async def tick(self) -> None:
        """Idle-input detection on every partition held (see ``PartitionProcessor.tick``). A failed
        delivery drops the in-memory changes; a later tick derives them again."""
        async with self._serial:
            if self.producer is None:  # stopped (or not started yet)
                return
            results = [(proc, proc.tick(self.settings.join.idle_input_s)) for proc in list(self.processors.values())]
            results = [(proc, r) for proc, r in results if r.messages or r.state_changes]
            try:
                await self._deliver(results)
            except DELIVERY_ERRORS as e:
                log.warning("idle-input tick: delivery failed (%r); partitions reopened", e)
                self.release({proc.partition for proc, _ in results})

    async def _deliver(self, results: list[tuple[PartitionProcessor, BatchResult]]) -> None:
        """Produce every message of ``results``, wait until the broker acknowledged all of them,
        then persist each partition's state. Raises the first delivery error, nothing persisted."""
        messages = [m for _, result in results for m in result.messages]
        if messages:
            await self._send_all(messages)
            for topic, n in Counter(topic for topic, _, _ in messages).items():
                metrics.EVENTS_OUT.labels("streamer", topic).inc(n)
        for proc, result in results:
            proc.commit(result)
            self.samples_out += result.samples

    async def _send_all(self, messages: list[tuple[str, bytes | None, bytes]]) -> None:
        """Send ``messages`` in record batches, one per partition (more when one fills up), to the
        partitions the default partitioner picks; wait for every batch's outcome, not just up to
        the first failure, so nothing of a failed attempt is still in flight when it is redone."""
        producer = self.producer
        if producer is None:
            raise KafkaError("the streamer's producer is not running")
        partitions = {t: sorted(await producer.partitions_for(t)) for t in {t for t, _, _ in messages}}
        batches: dict[tuple[str, int], Any] = {}
        futures: list[asyncio.Future] = []
        part_of = self._partition_cache(partitions)
        try:
            for topic, key, value in messages:
                part = part_of[topic].get(key)
                if part is None:
                    parts = partitions[topic]
                    part = self._partitioner(key, parts, parts)
                    if key is not None:  # no key: a random partition each time, never remembered
                        part_of[topic][key] = part
                batch = batches.get((topic, part))
                if batch is None:
                    batch = batches[(topic, part)] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
                    futures.append(await producer.send_batch(batch, topic, partition=part))
                    batch = batches[(topic, part)] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any size
            for (topic, part), batch in batches.items():
                futures.append(await producer.send_batch(batch, topic, partition=part))
        except BaseException:
            for f in futures:  # this attempt is abandoned: its failures are expected, not news
                f.add_done_callback(_retrieve)
            raise
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            raise failed

    def _partition_cache(self, partitions: dict[str, list[int]]) -> dict[str, dict]:
        """Per topic, key -> partition as the partitioner picked it (murmur2 in pure Python costs
        ~2 us a record; a user's samples share a key). Forgotten when the topic's partitions
        change, and when it grows beyond :data:`PARTITION_CACHE_KEYS` keys."""
        out = {}
        for topic, parts in partitions.items():
            known = self._partitions_seen.get(topic)
            cache = self._key_partitions.get(topic)
            if known != parts or cache is None or len(cache) > PARTITION_CACHE_KEYS:
                self._partitions_seen[topic] = list(parts)
                cache = self._key_partitions[topic] = {}
            out[topic] = cache
        return out

    def close(self) -> None:
        """Close the partitions' stores (the producer is stopped by :meth:`stop`)."""
        self.release(set(self.processors))


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class _StreamerProducer(mode.Service):
    """Starts and stops the streamer's producer with the faust app."""

    def __init__(self, streamer: Streamer, **kwargs: Any):
        self.streamer = streamer
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.streamer.start()

    async def on_stop(self) -> None:
        await self.streamer.stop()


def faust_app(settings: Settings, name: str, eager_hand_over: bool = True) -> faust.App:
    """A faust app (consumer group ``<prefix><name>``) configured as the streamer's; the
    benchmark's baseline of faust alone is built with it too. ``eager_hand_over``: faust's
    aiokafka transport with the cheaper hand-over of ``streamer/faust_transport.py`` (False:
    faust's own, for comparison)."""
    t = settings.topics
    Path(settings.state_dir, "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{t.prefix}{name}",
        store="memory://",  # faust's own tables are unused: state lives in the feature store
        topic_partitions=t.partitions,
        topic_allow_declare=False,  # `dmrstream topics create` owns topic layout
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        datadir=str(Path(settings.state_dir) / "faust"),
        **faust_broker_options(settings),
    )
    if eager_hand_over:  # App.transport's setter: used instead of the one the broker URL names
        app.transport = EagerHandOverTransport(app.conf.broker_consumer, app, loop=app.loop)
    return app


def create_app(settings: Settings, open_store: Callable[[int], Any] | None = None) -> faust.App:
    """The faust app; ``open_store(partition)`` gives that partition's feature store."""
    if open_store is None:
        from featurestore import open_partition_store

        def open_store(partition: int):
            return open_partition_store(settings, partition)

    t = settings.topics
    app = faust_app(settings, "streamer")
    streamer = Streamer(settings, open_store)
    # A dependency added before the app starts is started before faust's own services (consumer,
    # agents, timers) and stopped after them, as faust's producer is.
    app.add_dependency(_StreamerProducer(streamer, loop=app.loop, beacon=app.beacon))
    app.streamer = streamer  # for the CLI and tests
    inputs = app.topic(t.name("impressions"), t.name("clicks"), key_serializer="raw", value_serializer="raw")
    # Whole fetches instead of faust's per-message stream path (streamer/faust_batches.py): faust
    # still subscribes, fetches, tracks and commits the offsets; a batch is acked once handled.
    batches = FetchBatches(app, [inputs])

    # An error other than a failed delivery (handle retries those) ends this task and faust
    # crashes the worker: nothing of the batch is acked, so the restarted worker redoes it
    # (faust's take_events acked a batch even when the agent's body raised).
    # No overlap of a batch's acknowledgements with the next batch: the loop acks a batch's
    # offsets when handle returns, so only once the state is persisted. While handle awaits the
    # broker, faust's consumer already fills the buffer with the next fetches.
    @app.task
    async def join():
        while True:
            messages = await batches.take(BATCH_MAX, BATCH_WITHIN_S)
            await streamer.handle(messages)  # faust's messages have a Record's attributes
            batches.ack(messages)

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
    # Before the faust Worker exists, so our own handlers: faust installs its own once it starts.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ready = wait_for_broker_at_start(settings, stop, "streamer")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not ready or stop.is_set():
        return
    tune_gc()
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        app.streamer.close()
