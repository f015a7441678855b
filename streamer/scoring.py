"""Scoring (SPEC section 8): the live model behind one atomic reference, micro-batched forward
passes, and the batch built by THE shared input function (``trainer.features``).

No Kafka here (see ``streamer/scoring_service.py``). Hot swap contract: a forward pass reads the
live reference exactly once, so every score of a pass comes from one whole, validated version,
and a swap (a single reference assignment) takes effect between passes. Loading and validation
happen elsewhere, off this path (``streamer/scoring_load.py``, ``streamer/scoring_swap.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from dmrstream.contracts import ItemScore, Score, ScoreRequest
from monitoring import metrics
from streamer.scoring_load import Loaded
from trainer.features import Batch, columns_to_batch

log = logging.getLogger(__name__)

_HIST_FIELDS = ("hist_item", "hist_category", "hist_behavior", "hist_position", "hist_gap", "mask")
_USER_FIELDS = ("user", "profile", "context")


class NoModel(RuntimeError):
    """No validated version is live yet."""


class ModelHolder:
    """The live :class:`Loaded` version behind one reference.

    Readers call :meth:`get` once per forward pass. Writers replace the reference under a lock
    (only writers contend); assigning an attribute is atomic for readers. ``history`` records
    when each version was live so tests can check a response's version was live."""

    def __init__(self) -> None:
        self._live: Loaded | None = None
        self.previous: Loaded | None = None
        self._lock = threading.Lock()
        self.history: list[list] = []  # [version, live since, replaced at] (monotonic s)
        self.swapping = threading.Event()  # set while a candidate is being loaded (bench/metrics)
        self.changed = threading.Condition(self._lock)

    def get(self) -> Loaded | None:
        return self._live

    @contextmanager
    def reading(self) -> Iterator[Loaded | None]:
        """The live version, counted as read until the block ends (see :meth:`wait_unread`)."""
        with self._lock:
            live = self._live
            if live is not None:
                live.readers += 1
        try:
            yield live
        finally:
            if live is not None:
                with self._lock:
                    live.readers -= 1
                    if not live.readers:
                        self.changed.notify_all()

    def wait_unread(self, loaded: Loaded, timeout: float) -> bool:
        """Wait until ``loaded`` is neither live nor read by any pass (its tensors may then be
        written); False on timeout."""
        with self._lock:
            return self.changed.wait_for(lambda: loaded is not self._live and not loaded.readers, timeout)

    def swap(self, new: Loaded) -> Loaded | None:
        """Make ``new`` live; returns the version it replaced (kept as ``previous``)."""
        with self._lock:
            # Times taken on both sides of the assignment: the recorded interval of each version
            # contains the moments it really was live, however this thread is preempted.
            since = time.monotonic()
            old, self._live = self._live, new
            replaced_at = time.monotonic()
            if old is not None and old.version != new.version:
                self.previous = old
            if self.history:
                self.history[-1][2] = replaced_at
            self.history.append([new.version, since, float("inf")])
            del self.history[:-10_000]  # bounded: a swap every few seconds for days
            self.changed.notify_all()
        metrics.MODEL_VERSION.labels("scorer").set(new.version)
        return old

    def wait(self, timeout: float | None = None) -> Loaded | None:
        """The live version, waiting up to ``timeout`` for the first one."""
        with self._lock:
            self.changed.wait_for(lambda: self._live is not None, timeout)
            return self._live

    def live_during(self, version: int, start: float, end: float) -> bool:
        """Whether ``version`` was live at some moment of [start, end] (monotonic seconds)."""
        return any(v == version and since <= end and until >= start for v, since, until in list(self.history))


@dataclass
class UserFeatures:
    """What the feature store knows of a request's user at the request's time."""

    hist_item_ids: list
    hist_category_ids: list
    hist_behaviors: list
    hist_ts: list
    user_profile: dict | None = None
    counters: list[dict] | None = None  # one per candidate (COUNTER_KEYS), or None

    @staticmethod
    def empty() -> "UserFeatures":
        return UserFeatures([], [], [], [])


class FeatureSource(Protocol):
    def lookup(self, requests: Sequence[ScoreRequest], partitions: Sequence[int | None]) -> list[UserFeatures]:
        """Features of each request's user (strictly before its ``ts``)."""


class NoFeatures:
    """Empty histories (a scorer with no feature store: cold users only)."""

    def lookup(self, requests, partitions):
        return [UserFeatures.empty() for _ in requests]


def request_batch(req: ScoreRequest, f: UserFeatures, settings: Any) -> Batch:
    """The model input of one request (see :func:`requests_batch`)."""
    return requests_batch([req], [f], settings)


def requests_batch(requests: Sequence[ScoreRequest], feats: Sequence[UserFeatures], settings: Any) -> Batch:
    """The model input of a micro-batch: each user's sequence once, repeated for each of its
    request's candidates.

    Built with ``columns_to_batch`` in two calls (one row per request for the user side, one row
    per candidate for the item side) so a history is hashed once instead of once per candidate
    and the pass costs two vectorised calls, not two per request; the result is identical to
    the batch of one Sample per candidate (tests check it)."""
    counts = np.fromiter((len(r.candidates) for r in requests), dtype=np.int64, count=len(requests))
    user = columns_to_batch({
        "user_id": [r.user_id for r in requests], "item_id": [0] * len(requests),
        "category_id": [0] * len(requests), "ts": [r.ts for r in requests],
        "hist_item_ids": [f.hist_item_ids for f in feats], "hist_category_ids": [f.hist_category_ids for f in feats],
        "hist_behaviors": [f.hist_behaviors for f in feats], "hist_ts": [f.hist_ts for f in feats],
        "user_profile": [f.user_profile for f in feats], "context": [r.context for r in requests]}, settings)
    cands = [c for r in requests for c in r.candidates]
    counters = None
    if any(f.counters is not None for f in feats):
        counters = [c for r, f in zip(requests, feats) for c in (f.counters or [None] * len(r.candidates))]
    items = columns_to_batch({
        "user_id": [0], "ts": np.repeat(np.asarray([r.ts for r in requests], dtype=np.int64), counts),
        "item_id": [c.item_id for c in cands], "category_id": [c.category_id for c in cands],
        "item_features": [c.item_features for c in cands], "counters": counters}, settings)
    for name in (*_HIST_FIELDS, *_USER_FIELDS):
        setattr(items, name, np.repeat(getattr(user, name), counts, axis=0))
    # one group per request (dense ids): the model computes each user side once (1.8x for DMR)
    items.group = np.repeat(np.cumsum(counts > 0) - 1, counts)
    return items


class Scorer:
    """Scores requests with the live version: one forward pass per call (a micro-batch)."""

    def __init__(self, holder: ModelHolder, features: FeatureSource, settings: Any):
        self.holder, self.features, self.settings = holder, features, settings

    def score(self, requests: Sequence[ScoreRequest], partitions: Sequence[int | None] | None = None,
              received: Sequence[float] | None = None, source: str = "request") -> list[Score]:
        """``Score`` per request, all from the ONE version live when this pass began.

        ``received``: perf_counter times the requests arrived (latency_ms counts from there)."""
        started = time.perf_counter()
        parts = partitions if partitions is not None else [None] * len(requests)
        feats = self.features.lookup(requests, parts)
        batch = requests_batch(requests, feats, self.settings).to_torch()
        with self.holder.reading() as live, torch.inference_mode():  # captured once for the whole pass
            if live is None:
                raise NoModel("no model version is live yet")
            probs = torch.sigmoid(live.model(batch)[0].float()).numpy().astype(np.float64)
        np.clip(probs, 0.0, 1.0, out=probs)
        done = time.perf_counter()
        stage = "during_swap" if self.holder.swapping.is_set() else "batch"
        metrics.SCORER_SECONDS.labels(stage).observe(done - started)
        now_ms = int(time.time() * 1000)
        out, i = [], 0
        for k, r in enumerate(requests):
            n = len(r.candidates)
            p = probs[i:i + n].tolist()
            i += n
            t_in = received[k] if received is not None else started
            out.append(Score(request_id=r.request_id, user_id=r.user_id, model_version=live.version,
                             scores=[ItemScore(c.item_id, s) for c, s in zip(r.candidates, p)], ts=now_ms,
                             latency_ms=max(0.0, (done - t_in) * 1000)))
            metrics.SCORER_SECONDS.labels("request").observe(done - t_in)
        metrics.SCORER_REQUESTS.labels(source).inc(len(requests))
        metrics.SCORER_CANDIDATES.inc(i)
        return out

    def score_each(self, requests: Sequence[ScoreRequest], partitions: Sequence[int | None] | None = None,
                   received: Sequence[float] | None = None, source: str = "request") -> list[Score | Exception]:
        """Like :meth:`score`, but a request that breaks the pass is answered alone, so one
        hostile request never fails the others (its slot holds the exception)."""
        try:
            return list(self.score(requests, partitions, received, source))
        except NoModel:
            raise
        except Exception:
            if len(requests) == 1:
                raise
        out: list[Score | Exception] = []
        for k, r in enumerate(requests):
            try:
                out.append(self.score([r], None if partitions is None else [partitions[k]],
                                      None if received is None else [received[k]], source)[0])
            except NoModel:
                raise
            except Exception as e:
                log.warning("request %s failed: %s", r.request_id, e)
                out.append(e)
        return out


class MicroBatcher:
    """Collects concurrent requests into one forward pass: up to ``max_batch`` requests or
    ``max_candidates`` candidates, waiting at most ``max_wait_ms`` after the first one."""

    def __init__(self, scorer: Scorer, max_batch: int = 64, max_candidates: int = 2048, max_wait_ms: float = 2.0,
                 no_model_wait_s: float = 30.0):
        self.scorer = scorer
        self.max_batch, self.max_candidates = max_batch, max_candidates
        self.max_wait = max_wait_ms / 1000
        self.no_model_wait_s = no_model_wait_s
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="scorer-batcher")
        self._thread.start()

    def submit(self, req: ScoreRequest, partition: int | None = None) -> "Future[Score]":
        fut: Future = Future()
        self._q.put((req, partition, fut, time.perf_counter()))
        return fut

    def close(self) -> None:
        self._stop.set()
        self._q.put(None)
        self._thread.join(10)

    def _collect(self, first) -> list:
        items, cands = [first], len(first[0].candidates)
        deadline = time.perf_counter() + self.max_wait
        while len(items) < self.max_batch and cands < self.max_candidates:
            try:
                item = self._q.get(timeout=max(0.0, deadline - time.perf_counter())) \
                    if self.max_wait else self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            items.append(item)
            cands += len(item[0].candidates)
        return items

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._q.get()
            if first is None:
                break
            items = self._collect(first)
            if self.scorer.holder.get() is None:  # a fresh scorer: hold requests until a version is live
                self.scorer.holder.wait(self.no_model_wait_s)
            try:
                results = self.scorer.score_each([i[0] for i in items], [i[1] for i in items],
                                                 [i[3] for i in items])
            except Exception as e:  # NoModel after the wait: every request of the pass fails
                results = [e] * len(items)
            for (_, _, fut, _), res in zip(items, results):
                if isinstance(res, Exception):
                    metrics.SCORER_RESPONSES.labels("failed").inc()
                    fut.set_exception(res)
                else:
                    metrics.SCORER_RESPONSES.labels("ok").inc()
                    fut.set_result(res)
