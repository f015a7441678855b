"""The trainer service: incremental DMR training from the ``samples`` topic.

A child process consumes, decodes and assembles the mini-batches ahead of the optimizer
(``trainer/prefetch.py``), so the device never waits on Python parsing; this process drops
repeated sample ids, scores each batch first (prequential metrics), then learns it.
Checkpoints hold model + optimizer + the offsets of what was learned + metric state + the
learned-ids log position, so a restart resumes exactly after the last checkpoint: nothing lost,
nothing learned twice. Versions are published to the model store (full every ``full_every_s``,
deltas every ``delta_every_s``) and announced on ``model-updates``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from kafka.errors import KafkaError

from dmrstream.contracts import ModelUpdate, encode
from dmrstream.kafkaio import make_producer, wait_for_broker_at_start
from dmrstream.settings import Settings
from monitoring import metrics
from trainer.checkpoint import LATEST, load_checkpoint, save_checkpoint
from trainer.model import build_model, build_optimizers, pick_device, scored_train_step
from trainer.modelstore import ModelStore, split_delta
from trainer.prefetch import Prefetch
from trainer.progressive import ProgressiveMetrics
from trainer.ready_batch import ReadyBatch

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # metrics (gauges, window AUCs) refreshed at most this often


class RecentIds:
    """Bounded memory of learned sample ids: the streamer re-emits after a crash within seconds,
    so repeats arrive close to their first copy."""

    def __init__(self, limit: int = 500_000):
        self.limit = limit
        self.ids: OrderedDict[str, None] = OrderedDict()

    def add(self, sid: str) -> bool:
        if sid in self.ids:
            return False
        self.ids[sid] = None
        if len(self.ids) > self.limit:
            self.ids.popitem(last=False)
        return True

    def __contains__(self, sid: str) -> bool:
        return sid in self.ids


class Trainer:
    """Model, optimizers, metrics, publishing and checkpoints; no Kafka (see :func:`run`)."""

    def __init__(self, settings: Settings, kind: str = "dmr", device: str | None = None):
        self.settings = settings
        if device:
            settings = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"device": device})})
        self.device = pick_device(settings)
        self.model = build_model(settings, kind).to(self.device)
        self.opts = build_optimizers(self.model, settings)
        self.metrics = ProgressiveMetrics(retain=settings.trainer.metrics_retain_samples)
        self.store = ModelStore(settings.model_store)
        self.dir = Path(settings.state_dir) / "trainer"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.learned_log = self.dir / "learned_ids.log"
        self.offsets: dict[int, int] = {}
        self.samples_topic_id: str | None = None  # the samples topic ``offsets`` belong to
        self.samples_seen = 0
        self.trained_until_ts = 0
        self.version = 0  # last published by this run (0: none yet)
        self.published_since_start = False
        self.recent = RecentIds()
        self.sparse_tables = [n + ".weight" for n, m in self.model.named_modules()
                              if isinstance(m, torch.nn.Embedding) and m.sparse]
        self.touched = self._no_rows_touched()
        self._restore()
        self._log = open(self.learned_log, "ab")
        self.last_checkpoint = time.monotonic()
        self.last_delta = self.last_full = time.monotonic()

    # -- state ----------------------------------------------------------------------------
    def _restore(self) -> None:
        ck = load_checkpoint(self.dir / "checkpoints")
        log_len = 0
        if ck is not None:
            model_state, opt_state, meta, arrays = ck
            self.model.load_state_dict(model_state)
            self.opts.load_state_dict(opt_state)
            self.metrics.load(arrays)
            self.offsets = {int(p): o for p, o in meta["offsets"].items()}
            self.samples_topic_id = meta.get("samples_topic_id")
            self.samples_seen = meta["samples_seen"]
            self.trained_until_ts = meta["trained_until_ts"]
            log_len = meta["learned_log_bytes"]
            log.info("resumed from checkpoint: %d samples, offsets %s", self.samples_seen, self.offsets)
        # Learning after the checkpoint was lost with the process: forget it in the log too.
        if self.learned_log.exists():
            with open(self.learned_log, "r+b") as f:
                f.truncate(log_len)
            for sid in self.learned_log.read_bytes().decode().split("\n")[-self.recent.limit:]:
                if sid:
                    self.recent.add(sid)

    def checkpoint(self) -> None:
        self._log.flush()
        meta = {"offsets": {str(p): o for p, o in self.offsets.items()}, "samples_topic_id": self.samples_topic_id,
                "samples_seen": self.samples_seen,
                "trained_until_ts": self.trained_until_ts, "learned_log_bytes": self._log.tell()}
        save_checkpoint(self.dir / "checkpoints", self.model, self.opts.state_dict(), meta, self.metrics.state())
        self.last_checkpoint = time.monotonic()
        metrics.TRAINER_CHECKPOINTS.inc()

    # -- learning -------------------------------------------------------------------------
    def learn(self, batch: ReadyBatch) -> dict[str, float]:
        """Score the batch (prequential), then learn it; repeats by sample id are dropped."""
        all_ids = batch.sample_ids
        keep, seen = [], set()
        for i, sid in enumerate(all_ids):  # repeats: already learned, or twice in this very batch
            if sid not in self.recent and sid not in seen:
                seen.add(sid)
                keep.append(i)
        stats: dict[str, float] = {}
        if keep:
            b, ts, fresh = batch.batch, batch.ts, all_ids
            if len(keep) < len(all_ids):  # drop the repeats' rows
                idx = np.asarray(keep)
                b, ts, fresh = b.slice(idx), ts[idx], [all_ids[i] for i in keep]
            on_device = b.to_torch(self.device, non_blocking=self.device.type == "cuda",
                                   pin=self.device.type == "cuda")
            # scored by the weights before this step (prequential), from the training pass itself
            stats, probs = scored_train_step(self.model, self.opts, on_device)
            self.metrics.update(probs.cpu().numpy(), b.label, ts)
            self._note_touched()
            for sid in fresh:
                self.recent.add(sid)
            self._log.write("".join(sid + "\n" for sid in fresh).encode())  # one write per batch
            self.samples_seen += len(fresh)
            self.trained_until_ts = max(self.trained_until_ts, int(ts.max()))
            metrics.TRAINER_SAMPLES.inc(len(fresh))
            metrics.TRAINER_LOSS.set(stats.get("loss", float("nan")))
        metrics.TRAINER_REPEATS.inc(len(all_ids) - len(keep))
        if batch.topic_id is not None and batch.topic_id != self.samples_topic_id:
            self.offsets = {}  # a re-created topic: offsets of the old one mean nothing
            self.samples_topic_id = batch.topic_id
        self.offsets.update(batch.offsets)
        return stats

    def _no_rows_touched(self) -> dict[str, torch.Tensor]:
        """One flag per table row (1 MB per 2^20 rows): marking is a vectorised write on the
        model's device, where a Python set of ~50,000 rows per step cost ~10 % of the step."""
        params = dict(self.model.named_parameters())
        return {t: torch.zeros(params[t].shape[0], dtype=torch.bool, device=params[t].device)
                for t in self.sparse_tables}

    def _note_touched(self) -> None:
        params = dict(self.model.named_parameters())
        for name in self.sparse_tables:
            g = params[name].grad
            if g is not None and g.is_sparse:
                self.touched[name][g._indices()[0]] = True  # repeats are harmless: no coalesce

    # -- publishing -----------------------------------------------------------------------
    def publish(self, kind: str) -> ModelUpdate:
        """Publish a full or delta version; the first after a (re)start is always full, so the
        chain never hangs on a version whose training this process no longer has."""
        if kind == "delta" and not self.published_since_start:
            kind = "full"
        started = time.perf_counter()
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        version = max(self.store.latest_version(), self.version) + 1
        base = self.version if kind == "delta" else None
        tensors = state if kind == "full" else split_delta(
            state, {t: m.nonzero().squeeze(1).cpu() for t, m in self.touched.items()}, self.sparse_tables)
        summary = {k: v for k, v in self.metrics.summary().items() if np.isfinite(v)}
        meta = self.store.publish(version, kind, tensors, base_version=base, trained_until_ts=self.trained_until_ts,
                                  samples_seen=self.samples_seen, metrics=summary)
        self.version = version
        self.published_since_start = True
        for m in self.touched.values():
            m.zero_()
        took = time.perf_counter() - started
        metrics.PUBLISH_SECONDS.labels(kind).observe(took)
        metrics.PUBLISH_BYTES.labels(kind).set(meta.size_bytes)
        metrics.MODEL_VERSION.labels("trainer").set(version)
        now = time.monotonic()
        self.last_delta = now
        if kind == "full":
            self.last_full = now
        log.info("published v%d (%s, %.1f kB, %.0f ms)", version, kind, meta.size_bytes / 1e3, took * 1e3)
        return ModelUpdate(version=version, kind=kind, base_version=base, uri=self.store.uri_of(meta),
                           sha256=meta.sha256, created_at=meta.created_at, trained_until_ts=max(self.trained_until_ts, 0),
                           samples_seen=self.samples_seen, metrics=summary)

    def due(self) -> str | None:
        """"full", "delta" or None by the publishing schedule."""
        t = self.settings.trainer
        now = time.monotonic()
        if self.samples_seen == 0:
            return None
        if not self.published_since_start or now - self.last_full >= t.full_every_s:
            return "full"
        if now - self.last_delta >= t.delta_every_s:
            return "delta"
        return None

    def report_metrics(self) -> dict[str, float]:
        summary = self.metrics.summary()
        for name, value in summary.items():
            if np.isfinite(value):
                metrics.TRAINER_QUALITY.labels(name).set(value)
        metrics.CHECKPOINT_AGE.set(time.monotonic() - self.last_checkpoint)
        return summary

    def close(self) -> None:
        self._log.close()


def run(settings: Settings, kind: str = "dmr", device: str | None = None, max_seconds: float | None = None,
        stop: threading.Event | None = None) -> Trainer:
    """Train from the samples topic until ``stop`` is set (or ``max_seconds`` pass). The model is
    built (and a checkpoint restored) first, so a bad setting fails at once; then a broker that is
    not up yet is waited for (:func:`~dmrstream.kafkaio.wait_for_broker_at_start`), and a stop
    during that wait returns the trainer untouched. ``max_seconds`` counts from the broker's answer.
    The prefetch runs in a child process (multiprocessing's spawn): a script that calls this needs
    the usual ``if __name__ == "__main__":`` guard."""
    stop = stop or threading.Event()
    trainer = Trainer(settings, kind, device)
    if not wait_for_broker_at_start(settings, stop, "trainer"):
        trainer.close()
        return trainer
    producer = make_producer(settings)
    updates_topic = settings.topics.name("model_updates")
    pre = Prefetch(settings, trainer.offsets, settings.model.batch_size, settings.trainer.max_wait_ms / 1000,
                   trainer.samples_topic_id).start()
    deadline = time.monotonic() + max_seconds if max_seconds else None
    started, learned_at_start = time.perf_counter(), trainer.samples_seen
    reported_at = float("-inf")

    def checkpoint() -> None:
        trainer.checkpoint()
        pre.commit_learned(trainer.offsets, trainer.samples_topic_id)  # the group shows what is durable

    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            batch = pre.get(timeout=0.2)
            if batch is not None:
                trainer.learn(batch)
            kind_due = trainer.due()
            if kind_due:
                update = trainer.publish(kind_due)
                announce(producer, updates_topic, update, stop)
                checkpoint()  # publish and checkpoint together: a restart never re-bases
                removed = trainer.store.prune(settings.trainer.keep_versions)
                if removed:
                    log.info("pruned versions %s", removed)
            elif time.monotonic() - trainer.last_checkpoint >= settings.trainer.checkpoint_every_s:
                checkpoint()
            # a report computes window AUCs (~3 ms): once a second, not once per batch
            if time.monotonic() - reported_at >= REPORT_EVERY_S:
                rate = (trainer.samples_seen - learned_at_start) / max(time.perf_counter() - started, 1e-9)
                metrics.TRAINER_SAMPLES_PER_S.set(rate)
                trainer.report_metrics()
                reported_at = time.monotonic()
    finally:
        if stop.is_set() or deadline is not None:
            checkpoint()
        pre.close()
        producer.close(timeout=5)
        trainer.close()
    return trainer


def announce(producer, topic: str, update: ModelUpdate, stop: threading.Event) -> bool:
    """Announce a published version on model-updates. A send failed by a broker that is away or
    restarting is retried with back-off until it is acknowledged or ``stop`` is set (then False:
    the version stays in the store, unannounced; the next start publishes a full one)."""
    delay = 0.2
    while True:
        try:
            producer.send(topic, key=b"model", value=encode(update)).get(timeout=30)
            return True
        except KafkaError as e:
            log.warning("announcing v%d failed (%s); retrying in %.1f s", update.version, e, delay)
            if stop.wait(delay):
                return False
            delay = min(delay * 2, 5.0)


def learned_ids(state_dir: Path | str) -> list[str]:
    """The ids this trainer has learned durably (up to its last checkpoint), in order. The log
    may hold more after a crash; the next start truncates it to the checkpoint."""
    root = Path(state_dir) / "trainer"
    path, pointer = root / "learned_ids.log", root / "checkpoints" / LATEST
    if not path.exists() or not pointer.is_file():
        return []
    meta = json.loads((root / "checkpoints" / pointer.read_text().strip() / "meta.json").read_text())
    data = path.read_bytes()[: meta["learned_log_bytes"]]
    return [s for s in data.decode().split("\n") if s]

