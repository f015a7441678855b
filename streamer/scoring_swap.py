"""Hot swap: follow model updates, load and validate each one off the serving path, swap it in;
refuse bad versions (metric + log, the last good one keeps serving); roll back on serving AUC."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Iterable

from dmrstream.contracts import ModelUpdate
from monitoring import metrics
from streamer.scoring import ModelHolder
from streamer.scoring_auc import ServingAUC
from streamer.scoring_load import Loaded, Refused, Validator, load_candidate
from streamer.scoring_spare import SpareReplica
from trainer.modelstore import ModelStore

log = logging.getLogger(__name__)


class Swapper:
    """Applies model updates in order on its own thread (:meth:`offer`), or synchronously
    (:meth:`apply`). Versions only move forward, except an automatic rollback."""

    def __init__(self, holder: ModelHolder, store: ModelStore, settings: Any, validator: Validator | None = None,
                 on_refused: Callable[[ModelUpdate, str], None] | None = None):
        self.holder, self.store, self.settings = holder, store, settings
        self.on_refused = on_refused  # called with the update and "reason: detail" (dead letters)
        self.validator = validator or Validator(settings)
        self.refused: dict[int, str] = {}  # version -> reason (refused or rolled back: never served again)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # one load at a time (the thread, or a direct apply)
        self._thread: threading.Thread | None = None
        self.spare = SpareReplica()  # the replaced version, reused for the next delta in place
        self.applied = 0

    # -- following updates ------------------------------------------------------------------
    def start(self) -> "Swapper":
        self._thread = threading.Thread(target=self._loop, daemon=True, name="scorer-swapper")
        self._thread.start()
        return self

    def offer(self, update: ModelUpdate) -> None:
        """Queue an update for the background thread (returns at once)."""
        self._q.put(update)

    def stop(self) -> None:
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(30)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every offered update has been handled (tests, bench)."""
        done = threading.Event()
        self._q.put(done)
        done.wait(timeout)

    def _loop(self) -> None:
        try:  # Linux: a thread is a task with its own niceness; loading yields the CPU to serving
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.apply(item)
            except Exception:  # never let one update kill the follower
                log.exception("model update v%s could not be handled", getattr(item, "version", "?"))

    def apply(self, update: ModelUpdate) -> bool:
        """Load, validate and swap ``update``; False when skipped (stale) or refused."""
        with self._lock:
            live = self.holder.get()
            if live is not None and update.version <= live.version:
                return False  # stale or repeated announcement (versions only move forward)
            if update.version in self.refused:
                return False
            self.holder.swapping.set()
            spare = None
            if update.kind == "delta" and live is not None and update.base_version == live.version:
                spare = self.spare.take(live, self.holder)
            try:
                new = load_candidate(update, self.store, self.validator, live, spare)
            except Refused as e:  # a spare it was written into is dropped with it
                self.refused[update.version] = e.reason
                metrics.SCORER_REFUSALS.labels(e.reason).inc()
                log.warning("refused model v%d (%s): %s; v%s keeps serving", update.version, e.reason, e.detail,
                            live.version if live else "none")
                if self.on_refused is not None:
                    try:
                        self.on_refused(update, f"{e.reason}: {e.detail}")
                    except Exception:  # reporting a refusal never stops the follower
                        log.exception("refusal of v%d could not be reported", update.version)
                return False
            finally:
                self.holder.swapping.clear()
            self.spare.keep(self.holder.swap(new), new)
            self.applied += 1
            metrics.SCORER_SWAPS.labels(update.kind).inc()
            set_freshness(new)
            log.info("serving model v%d (%s)", new.version, update.kind)
            return True

    def bootstrap(self, updates: Iterable[ModelUpdate]) -> Loaded | None:
        """A fresh scorer: serve the newest announced version that loads and validates, trying
        older ones when it cannot (pruned, corrupt). Returns what is live."""
        for update in sorted(updates, key=lambda u: u.version, reverse=True):
            if self.apply(update):
                break
        return self.holder.get()

    # -- automatic rollback -----------------------------------------------------------------
    def check_rollback(self, auc: ServingAUC) -> bool:
        """Swap back to the previous version when the live one's serving AUC fell below it by
        more than the margin (both with enough labelled samples). The bad version is never
        served again; newer versions are still accepted (and judged the same way)."""
        s = self.settings.scorer
        with self._lock:
            live, prev = self.holder.get(), self.holder.previous
            if not s.auto_rollback or live is None or prev is None or prev.version in self.refused:
                return False
            if not auc.should_roll_back(live.version, prev.version, s.rollback_min_samples, s.rollback_margin):
                return False
            (a, n), (b, m) = auc.auc(live.version), auc.auc(prev.version)
            self.refused[live.version] = "rolled_back"
            self.spare.drop()  # it may be ``prev``; the next version loads whole
            self.holder.swap(prev)
            metrics.SCORER_ROLLBACKS.inc()
            metrics.SCORER_SWAPS.labels("rollback").inc()
            set_freshness(prev)
            log.warning("rolled back v%d (serving AUC %.4f over %d) to v%d (%.4f over %d)",
                        live.version, a, n, prev.version, b, m)
            return True


# Newest event time this scorer has seen (ms). Freshness is measured on the stream's own clock, so
# a replay of old logs reports how far the model trails the stream, not the years since the data.
_event_clock_ms: list[int] = [0]


def observe_event_time(ts_ms: int) -> None:
    if ts_ms > _event_clock_ms[0]:
        _event_clock_ms[0] = ts_ms


def set_freshness(live: Loaded | None) -> None:
    """Freshness gauge: now (the newest event time seen; the wall clock before any event) minus
    the newest event time the serving model learned from."""
    if live is not None and live.trained_until_ts:
        now_ms = _event_clock_ms[0] or time.time() * 1000
        metrics.SCORER_FRESHNESS.set(max(0.0, (now_ms - live.trained_until_ts) / 1000))
