"""The faust-streaming app: consumes impressions and clicks (co-partitioned by user), keeps the
feature store, joins labels and produces samples and dead letters.

One feature store per partition (RocksDB via rocksdict) under ``state_dir``; a partition's store
is opened when the partition is assigned and closed when it is revoked, so state follows
partitions on rebalance. Several workers (processes with the same app id) share the partitions.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
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


def fetch_buffer_size(settings: Settings) -> int:
    """The bound at which the consumer stops fetching for the batch loop (a fetch in hand is still
    put whole, so the buffer can overshoot it): at least three batches, so that a full batch is
    always there to take on a backlog. Below one batch the bound would stop the consumer before a
    batch fills, and every take would wait out ``batch_within_ms``."""
    return max(20_000, 3 * settings.streamer.batch_max_events)


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
        self._in_flight: _InFlight | None = None  # see submit

    async def start(self) -> None:
        if self.producer is None:
            self.producer = AIOKafkaProducer(**producer_options(self.settings))
            await self.producer.start()

    async def stop(self) -> None:
        """Finish the batch in flight (its acks, its state), then stop the producer this streamer
        started, once a batch or tick in progress is done."""
        async with self._serial:
            try:
                await self._finish_in_flight(retry=False)
            except DELIVERY_ERRORS as e:  # redelivered after the restart: nothing lost
                log.warning("stopping with a batch in flight that could not be delivered (%r)", e)
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

    @property
    def in_flight(self) -> bool:
        """Whether a submitted batch still waits for its acks (see :meth:`submit`)."""
        return self._in_flight is not None

    async def handle(self, records: list[Record]) -> None:
        """Process a consumed batch partition by partition, produce everything it emits, wait for
        the broker's acks of all of it, and only then persist each partition's state (see
        ``streamer/processor.py``). Returns once the state is persisted: faust acks the batch's
        offsets after that. A record is anything with a :class:`Record`'s attributes (faust's
        consumer messages are passed as they are). A batch in flight is finished first."""
        await self.submit(records)
        await self.flush()

    async def submit(self, records: list[Record], on_done: Callable[[], None] = lambda: None) -> None:
        """:meth:`handle` pipelined by one batch: process ``records`` and start sending what they
        emit, then finish the batch submitted before (await its acks, persist its state, call its
        ``on_done``), so the broker acknowledges one batch while the event loop processes the
        next. This batch stays in flight until the next :meth:`submit`, :meth:`flush`, tick or
        stop finishes it. States are persisted in batch order.

        A failed delivery sends the batch's messages again (the same bytes: the processing is
        not redone, so the samples and their counters are exactly the first attempt's), backing
        off up to 5 s between attempts, until the broker acknowledges them all; only then is its
        state persisted. Copies that got through before are repeats the trainer drops by id."""
        async with self._serial:
            started = time.perf_counter()
            by_partition = _by_partition(records)
            procs = [(self.processor(p), recs) for p, recs in by_partition.items()]
            batch = _InFlight(len(records), set(by_partition), [(proc, proc.process(recs)) for proc, recs in procs],
                              started, on_done)
            await self._start(batch)
            previous, self._in_flight = self._in_flight, batch
            if previous is not None:
                try:
                    await self._finish(previous)
                except BaseException:
                    self._drop(previous, batch)
                    raise

    async def flush(self) -> None:
        """Finish the batch in flight, if any (see :meth:`submit`)."""
        async with self._serial:
            await self._finish_in_flight()

    async def _finish_in_flight(self, retry: bool = True) -> None:
        batch, self._in_flight = self._in_flight, None
        if batch is not None:
            try:
                await self._finish(batch, retry)
            except BaseException:
                self._drop(batch)
                raise

    def _drop(self, *batches: "_InFlight") -> None:
        """Finishing was interrupted (the task cancelled as the worker stops, or an error): the
        in-memory joins of these batches' partitions are ahead of what was persisted, so no
        later batch may persist on top of them. Drop them; the batches are redelivered."""
        if self._in_flight in batches:
            self._in_flight = None
        self.release(set().union(*(b.partitions for b in batches)))

    async def _start(self, batch: "_InFlight") -> None:
        """Queue the batch's messages (a refusal is kept as its failure, seen by _finish)."""
        try:
            batch.futures = await self._start_sends(batch.messages)
        except DELIVERY_ERRORS as e:
            batch.futures, batch.error = [], e

    async def _finish(self, batch: "_InFlight", retry: bool = True) -> None:
        """Wait until every message of ``batch`` is acknowledged (sending again after a failure,
        unless ``retry`` is False: then the failure is raised), then persist its state."""
        attempt = 0
        while True:
            outcomes = await asyncio.gather(*batch.futures, return_exceptions=True)
            failed = batch.error or next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failed is None:
                break
            if not retry:
                raise failed
            attempt += 1
            log.warning("partitions %s: delivery failed (%r); sending again (%d)",
                        sorted(batch.partitions), failed, attempt)
            await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
            batch.error = None
            await self._start(batch)
        self._persist(batch.results)
        took = time.perf_counter() - batch.started
        metrics.BATCH_SECONDS.observe(took)
        if batch.events:  # a tick's output counts no consumed events
            self.batch_times.append((took, batch.events))
            self.events_in += batch.events
        batch.on_done()

    async def tick(self) -> None:
        """Idle-input detection on every partition held (see ``PartitionProcessor.tick``), after
        the batch in flight is finished; what it emits is delivered and persisted as a batch."""
        async with self._serial:
            if self.producer is None:  # stopped (or not started yet)
                return
            await self._finish_in_flight()
            results = [(proc, proc.tick(self.settings.join.idle_input_s)) for proc in list(self.processors.values())]
            results = [(proc, r) for proc, r in results if r.messages or r.state_changes]
            if results:
                batch = _InFlight(0, {proc.partition for proc, _ in results}, results, time.perf_counter())
                await self._start(batch)
                self._in_flight = batch
                await self._finish_in_flight()

    def _persist(self, results: list[tuple[PartitionProcessor, BatchResult]]) -> None:
        """The batch's messages are acknowledged: count them and persist each partition's state."""
        for topic, n in Counter(topic for _, result in results for topic, _, _ in result.messages).items():
            metrics.EVENTS_OUT.labels("streamer", topic).inc(n)
        for proc, result in results:
            proc.commit(result)
            self.samples_out += result.samples

    async def _start_sends(self, messages: list[tuple[str, bytes | None, bytes]]) -> list[asyncio.Future]:
        """Queue ``messages`` in record batches, one per partition (more when one fills up), to the
        partitions the default partitioner picks; returns one future per batch. :meth:`_finish`
        waits for all of them, not just up to the first failure, so nothing of a failed attempt
        is still in flight when it is sent again."""
        if not messages:
            return []
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
        return futures

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


@dataclass(slots=True)
class _InFlight:
    """A processed batch whose messages are sent but not yet all acknowledged."""

    events: int  # consumed messages in it
    partitions: set[int]
    results: list[tuple[PartitionProcessor, BatchResult]]
    started: float
    on_done: Callable[[], None] = lambda: None
    futures: list = field(default_factory=list)  # one per record batch sent
    error: BaseException | None = None  # the sending itself was refused

    @property
    def messages(self) -> list[tuple[str, bytes | None, bytes]]:
        return [m for _, result in self.results for m in result.messages]


def _by_partition(records: list) -> dict[int, list]:
    by_partition: dict[int, list] = defaultdict(list)
    for r in records:
        by_partition[r.partition].append(r)
    return by_partition


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
    batches = FetchBatches(app, [inputs], max_buffered=fetch_buffer_size(settings))
    batch_max, batch_within_s = settings.streamer.batch_max_events, settings.streamer.batch_within_ms / 1000

    # An error other than a failed delivery (submit retries those) ends this task and faust
    # crashes the worker: nothing of the batch (nor of the one in flight) is acked, so the
    # restarted worker redoes them (faust's take_events acked a batch even when the agent's body
    # raised). Batches are pipelined by one (Streamer.submit): while the broker acknowledges a
    # batch's samples the loop processes the next, and a batch's offsets are acked only once
    # its state is persisted. When no full batch is buffered the one in flight is finished
    # first, so a quiet stream never holds it back (and a rebalance, which clears the buffer
    # and waits until every taken message is acked, never waits for it).
    @app.task
    async def join():
        while True:
            if streamer.in_flight and batches.buffered < batch_max:
                await streamer.flush()
            messages = await batches.take(batch_max, batch_within_s)
            # aiokafka's records have a Record's attributes
            await streamer.submit(messages, on_done=functools.partial(batches.ack, messages))

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
