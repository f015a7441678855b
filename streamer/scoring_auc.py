"""Serving AUC per model version: served scores joined with the labels that arrive later.

The scorer records (impression event id -> served score, version) as it scores impressions; the
streamer's sample for that impression (same ``event_id``) brings the label minutes later. Each
version keeps an exact AUC over its last ``window`` labelled samples. Memory is bounded: the
oldest served scores are forgotten first (their samples then simply do not count).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

import numpy as np

from monitoring import metrics
from trainer.evaluate import auc


class ServingAUC:
    """Served scores awaiting labels, and per-version windows of (score, label)."""

    def __init__(self, window: int = 20_000, memory: int = 1_000_000, keep_versions: int = 50):
        self.window, self.memory, self.keep_versions = window, memory, keep_versions
        self._served: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._windows: dict[int, deque] = {}
        self._lock = threading.Lock()

    def served(self, event_id: str, score: float, version: int) -> None:
        """Remember the score served for an impression (the first one wins: redeliveries of the
        impression are scored again, but the user saw the first score)."""
        with self._lock:
            if event_id in self._served:
                return
            self._served[event_id] = (score, version)
            if len(self._served) > self.memory:
                self._served.popitem(last=False)

    def labelled(self, event_id: str, label: int) -> int | None:
        """Join a label to its served score; returns the version it counted for (None: unknown)."""
        with self._lock:
            hit = self._served.pop(event_id, None)
            if hit is None:
                return None
            score, version = hit
            w = self._windows.get(version)
            if w is None:
                w = self._windows[version] = deque(maxlen=self.window)
                for old in sorted(self._windows)[:-self.keep_versions]:
                    del self._windows[old]
                    metrics.SERVING_AUC.remove(str(old)) if _has(metrics.SERVING_AUC, old) else None
                    metrics.SERVING_LABELLED.remove(str(old)) if _has(metrics.SERVING_LABELLED, old) else None
            w.append((score, label))
            return version

    def auc(self, version: int) -> tuple[float, int]:
        """(exact AUC, labelled samples) of ``version``; NaN while one class is missing."""
        with self._lock:
            w = list(self._windows.get(version, ()))
        if not w:
            return float("nan"), 0
        a = np.asarray(w, dtype=np.float64)
        return auc(a[:, 1], a[:, 0]), len(w)

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._windows)

    def publish_metrics(self) -> dict[int, tuple[float, int]]:
        """Set the per-version gauges; returns {version: (auc, n)}."""
        out = {}
        for v in self.versions():
            a, n = self.auc(v)
            out[v] = (a, n)
            if np.isfinite(a):
                metrics.SERVING_AUC.labels(str(v)).set(a)
            metrics.SERVING_LABELLED.labels(str(v)).set(n)
        return out

    def should_roll_back(self, version: int, predecessor: int, min_samples: int, margin: float) -> bool:
        """True when both versions have >= ``min_samples`` labelled samples and ``version``'s
        serving AUC is below ``predecessor``'s by more than ``margin``."""
        a, n = self.auc(version)
        b, m = self.auc(predecessor)
        return n >= min_samples and m >= min_samples and bool(np.isfinite(a) and np.isfinite(b)) and a < b - margin


def _has(gauge, version: int) -> bool:
    return (str(version),) in getattr(gauge, "_metrics", {})
