"""Progressive (prequential) validation metrics: every batch is scored before it is learned.

Exact AUC over a sliding window of the most recent samples and over everything so far, logloss
and calibration (mean predicted vs actual click rate). The state is plain arrays so a checkpoint
can carry it.
"""

from __future__ import annotations

import numpy as np

from trainer.evaluate import auc, logloss


class ProgressiveMetrics:
    """Sliding-window and cumulative prequential metrics."""

    def __init__(self, window: int = 20_000):
        self.window = window
        self.scores = np.zeros(0, dtype=np.float32)
        self.labels = np.zeros(0, dtype=np.int8)
        self.ts = np.zeros(0, dtype=np.int64)  # event time of each prediction: AUC over any time range
        self.recent = 0  # how many of the trailing entries form the window (<= window)

    def update(self, scores: np.ndarray, labels: np.ndarray, ts: np.ndarray) -> None:
        self.scores = np.concatenate([self.scores, np.asarray(scores, dtype=np.float32)])
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=np.int8)])
        self.ts = np.concatenate([self.ts, np.asarray(ts, dtype=np.int64)])
        self.recent = min(self.window, len(self.scores))

    @property
    def count(self) -> int:
        return len(self.scores)

    def summary(self) -> dict[str, float]:
        """auc_window, auc_cumulative, logloss_window, ctr_predicted/actual over the window."""
        if not self.count:
            return {}
        ws, wl = self.scores[-self.recent:], self.labels[-self.recent:]
        return {
            "auc_window": auc(wl, ws),
            "auc_cumulative": auc(self.labels, self.scores),
            "logloss_window": logloss(wl, ws),
            "ctr_predicted_window": float(ws.mean()),
            "ctr_actual_window": float(wl.mean()),
            "samples": float(self.count),
        }

    def state(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores, "labels": self.labels, "ts": self.ts}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.scores = np.asarray(state["scores"], dtype=np.float32)
        self.labels = np.asarray(state["labels"], dtype=np.int8)
        self.ts = np.asarray(state.get("ts", np.zeros(len(self.labels))), dtype=np.int64)
        self.recent = min(self.window, len(self.scores))
