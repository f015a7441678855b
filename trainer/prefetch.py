"""Reading ahead of the optimizer: a child process consumes ``samples``, decodes each mini-batch
(column-wise when the whole batch allows it, message by message with dead letters otherwise),
assembles the model input, and hands it to the trainer ready to learn.

Why a process, at low priority (bench/trainer.py, batch 1024 on this 2-core host): the ~30 ms of
Python per batch (kafka-python's record parsing ~11 ms, decode ~16 ms, assembly ~6 ms) in a thread
of the trainer's process contended with torch's two threads for the cores and for the GIL, and
the step slowed by about as much: end to end 0.76 of the pure step. In a child process it holds no
GIL of the trainer's, and at nice 19 (``trainer.prefetch_nice``) it mostly runs where torch leaves
a core idle: 0.784-0.955 over 16 runs, median 0.86 (a child at nice 0: 0.763-0.77).

The child exits when asked, and on its own when the trainer is gone (even killed with SIGKILL:
it watches its parent's pid), so a crashed trainer never leaves a consumer behind.

Its consumer assigns the partitions itself and starts at the checkpoint's offsets (the checkpoint
is the truth for resuming: offsets, model and optimizer together). After each checkpoint the
trainer sends the learned offsets here, and they are committed to the consumer group
``<prefix>trainer``, so Kafka's tools and the lag gauge (``monitoring/lag.py``) see its progress.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from dmrstream.contracts import ContractError, dead_letter_of
from dmrstream.kafkaio import TopicIdWatch, make_consumer, make_producer, reread_recreated
from dmrstream.settings import Settings
from monitoring import metrics
from trainer.ready_batch import ReadyBatch, decode_ready, encode_ready
from trainer.sample_decode import SampleColumnsDecoder

log = logging.getLogger(__name__)

PREFETCH_QUEUE = 8  # batches ready ahead of the optimizer
_POLL_S = 0.1  # how often a blocked child looks at its stop flag and its parent
_FINAL_COMMIT_MS = 2000  # the commit of the last learned offsets at a stop waits this long at most

Learned = tuple[dict[int, int], str | None]  # partition -> next offset learned, the topic's id


def trainer_group(settings: Settings) -> str:
    """The consumer group the trainer commits its learned offsets to."""
    return f"{settings.topics.prefix}trainer"


class PrefetchFailed(RuntimeError):
    """The prefetch process failed or died."""


class SampleReader:
    """The child's loop: consume ``samples`` from the start offsets, cut mini-batches by size or
    max wait, decode, dead-letter the bad messages, and hand each batch over."""

    def __init__(self, settings: Settings, start_offsets: dict[int, int], start_topic_id: str | None,
                 batch_size: int, max_wait_s: float):
        self.settings, self.start_offsets = settings, start_offsets
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.columns = SampleColumnsDecoder(settings.limits)
        self.codec = self.columns.codec  # message by message, for the batches it declines
        self.topic = settings.topics.name("samples")
        self.watch = TopicIdWatch(self.topic, start_topic_id)  # the topic the start offsets belong to

    def run(self, hand_over: Callable[[ReadyBatch], bool], stopped: Callable[[], bool],
            learned: Callable[[], Learned | None] = lambda: None) -> None:
        """Until ``stopped()``; ``hand_over`` returns False when it gave up on a stop; ``learned()``
        gives the newest checkpointed offsets (or None: nothing new) to commit to the group."""
        consumer = make_consumer(self.settings, trainer_group(self.settings), [])
        producer = make_producer(self.settings)
        parts = [TopicPartition(self.topic, p) for p in range(self.settings.topics.partitions)]
        consumer.assign(parts)
        for tp in parts:
            if tp.partition in self.start_offsets:
                consumer.seek(tp, self.start_offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        pending: list = []  # the records of the next batch
        offsets: dict[int, int] = {}
        first_at = None
        latest = None  # the newest learned offsets received: committed once more, synchronously, at the end
        try:
            while not stopped():
                got = learned()
                if got is not None:
                    latest = got
                    self._commit(consumer, got, sync=False)
                records = consumer.poll(timeout_ms=int(_POLL_S * 1000), max_records=self.batch_size)
                if reread_recreated(consumer, [self.watch]):  # a memory broker restarted empty; repeats dropped by id
                    offsets = {tp.partition: 0 for tp in parts}
                for tp, recs in records.items():
                    if recs:
                        offsets[tp.partition] = recs[-1].offset + 1
                        pending.extend(recs)
                if (pending or offsets) and first_at is None:
                    first_at = time.monotonic()
                if first_at is not None and (len(pending) >= self.batch_size
                                             or time.monotonic() - first_at >= self.max_wait_s):
                    if not hand_over(self.ready(pending, offsets, producer)):
                        return
                    pending, offsets, first_at = [], {}, None
        finally:
            self._commit(consumer, learned() or latest, sync=True)
            producer.close(timeout=5)
            consumer.close()

    def _commit(self, consumer: Any, got: Learned | None, sync: bool) -> None:
        """Commit learned offsets to the group: for monitoring, so a failure is logged, not fatal.
        Offsets of another incarnation of the topic (re-created since) are not committed."""
        if got is None or not got[0] or got[1] != self.watch.known:
            return
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in got[0].items()}
        try:
            if sync:
                consumer.commit(offsets, timeout_ms=_FINAL_COMMIT_MS)
            else:
                consumer.commit_async(offsets, callback=_log_failed_commit)
        except Exception as e:  # noqa: BLE001 - the broker may be away; the checkpoint has them
            log.warning("committing learned offsets to %s failed: %r", trainer_group(self.settings), e)

    def ready(self, records: list, offsets: dict[int, int], producer: Any) -> ReadyBatch:
        """The batch of ``records``: decoded column-wise when every one allows it, else message by
        message with the bad ones dead-lettered."""
        decoded = self.columns.decode([r.value for r in records]) if records else None
        if decoded is not None:
            return ReadyBatch.of_columns(decoded, offsets, self.settings, self.watch.known)
        samples, refused = [], {}
        for r in records:
            try:
                samples.append(self.codec.decode(r.value))
            except ContractError as e:
                kind = metrics.reason_kind(e.reason)
                refused[kind] = refused.get(kind, 0) + 1
                key, value = dead_letter_of(e.reason, r, "trainer")
                producer.send(self.settings.topics.name("dead_letters"), key=key, value=value)
        return ReadyBatch.of_samples(samples, offsets, self.settings, self.watch.known, refused)


def _log_failed_commit(offsets: Any, result: Any) -> None:
    if isinstance(result, Exception):
        log.warning("committing learned offsets failed: %r", result)


@dataclass(frozen=True)
class PrefetchJob:
    """What the prefetch process is started with. multiprocessing hands it over pickled, between
    this trainer and its own child: the settings arrive whole, secrets included (their JSON form
    masks them)."""

    settings: Settings
    start_offsets: dict[int, int]
    start_topic_id: str | None
    batch_size: int
    max_wait_s: float
    parent_pid: int
    log_level: int


def _child_main(job: PrefetchJob, out: Any, failure: Any, stop: Any, commits: Any) -> None:
    """The prefetch process: a :class:`SampleReader` putting encoded batches on ``out``; why it
    failed, if it does, on ``failure`` (written at once: no feeder thread to outlive)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the trainer stops us
    logging.basicConfig(level=job.log_level, format="%(asctime)s %(levelname)s %(name)s (prefetch): %(message)s")
    if job.settings.trainer.prefetch_nice:
        os.nice(job.settings.trainer.prefetch_nice)
    out.cancel_join_thread()  # at exit, drop batches nobody will read rather than wait for a reader

    def stopped() -> bool:
        return stop.is_set() or os.getppid() != job.parent_pid

    def hand_over(rb: ReadyBatch) -> bool:
        data = encode_ready(rb)
        while not stopped():  # bounded waits: a stop must not hang on a full queue
            try:
                out.put(data, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def learned() -> Learned | None:  # the newest the trainer sent, if any
        got = None
        while not commits.empty():
            got = commits.get()
        return got

    try:
        SampleReader(job.settings, job.start_offsets, job.start_topic_id, job.batch_size,
                     job.max_wait_s).run(hand_over, stopped, learned)
    except BaseException as e:  # noqa: BLE001 - reported to the trainer, which exits non-zero
        log.exception("prefetch failed")
        failure.put(f"{type(e).__name__}: {e}")
        os._exit(1)


class Prefetch:
    """The trainer's handle on its prefetch process: :meth:`get` the next ready batch."""

    def __init__(self, settings: Settings, start_offsets: dict[int, int], batch_size: int, max_wait_s: float,
                 start_topic_id: str | None = None, queue_size: int = PREFETCH_QUEUE):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process running torch's threads
        self.out = ctx.Queue(maxsize=queue_size)
        self.failure = ctx.SimpleQueue()
        # Learned offsets to commit to the group, newest last. A SimpleQueue writes into the pipe
        # before put returns (no feeder thread), so offsets sent just before a stop are there to read.
        self.commits = ctx.SimpleQueue()
        self.stop_flag = ctx.Event()
        self.topic = settings.topics.name("samples")
        self.job = PrefetchJob(settings, dict(start_offsets), start_topic_id, batch_size, max_wait_s, os.getpid(),
                               logging.getLogger().getEffectiveLevel())
        self.process = ctx.Process(target=_child_main, name="trainer-prefetch", daemon=True,
                                   args=(self.job, self.out, self.failure, self.stop_flag, self.commits))

    def start(self) -> "Prefetch":
        self.process.start()
        return self

    def full(self) -> bool:
        """True when the queue holds as many batches as it can."""
        return self.out.full()

    def get(self, timeout: float) -> ReadyBatch | None:
        """The next batch, or None after ``timeout`` s without one; :class:`PrefetchFailed` once the
        process has failed or died and every batch it handed over was taken. The batch's dead
        letters are counted here, in the process whose metrics are served."""
        try:
            data = self.out.get(timeout=timeout)
        except queue.Empty:
            if not self.process.is_alive():
                why = self.failure.get() if not self.failure.empty() else "no reason given"
                raise PrefetchFailed(f"the prefetch process exited with code {self.process.exitcode}: {why}") from None
            return None
        rb = decode_ready(data)
        for kind, n in rb.dead_letters.items():
            metrics.DEAD_LETTERS.labels("trainer", self.topic, kind).inc(n)
        return rb

    def commit_learned(self, offsets: dict[int, int], topic_id: str | None) -> None:
        """Have the process commit these checkpointed offsets to the trainer's group (it does at
        its next poll, and once more as it stops)."""
        self.commits.put((dict(offsets), topic_id))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the process and wait for it (killed if it does not end within ``timeout``)."""
        self.stop_flag.set()
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the prefetch process did not stop in %.0f s: killing it", timeout)
            self.process.kill()
            self.process.join(5)
        self.out.close()
        self.commits.close()

    def __enter__(self) -> "Prefetch":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
