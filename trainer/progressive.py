"""Progressive (prequential) validation metrics: every batch is scored before it is learned.

Memory and checkpoints stay bounded however long the trainer runs: only the most recent
``retain`` samples' (score, label, event time) are kept. Window figures (AUC, logloss, predicted
vs actual click rate over the last ``window`` samples) come from them. Cumulative figures cover
the whole stream without keeping it: logloss and click rates from running sums, and AUC from a
fixed-size score histogram of positives and negatives (4 MB). While the stream is no longer than
``retain`` the cumulative AUC is exact (kept incrementally, so a report costs no sort of the
stream); beyond it, the histogram figure is within ``auc_cumulative_tie_bound`` of the exact one.
The state is plain numeric arrays so a checkpoint can carry it.
"""

from __future__ import annotations

import numpy as np

from trainer.evaluate import auc, logloss

# Histogram bin of a score in [0, 1]: the top bits of its float32 pattern, which for non-negative
# floats grows with the value. 20 bits kept: relative resolution 2^-11 (0.05 %), 260,097 bins.
_SHIFT = 12
NBINS = (int(np.float32(1.0).view(np.uint32)) >> _SHIFT) + 1


def _clean(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Scores as float32 in [0, 1] (NaN -> 0.5, uninformative; others clipped), and how many
    were outside [0, 1] or NaN: one diverged prediction must not poison the cumulative sums."""
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    invalid = int((~((s >= 0) & (s <= 1))).sum())  # NaN compares false
    if invalid:
        s = np.clip(np.where(np.isnan(s), np.float32(0.5), s), 0, 1)
    return s + np.float32(0), invalid  # + 0: -0.0 becomes +0.0, whose bit pattern is the lowest bin


def _pairs2(pos: np.ndarray, neg: np.ndarray) -> int:
    """Twice the Mann-Whitney count of ``pos`` over sorted ``neg``: 2 per pair with the positive
    higher, 1 per tie (sorted ``pos`` speeds the search up)."""
    return int(np.searchsorted(neg, pos, "left").sum() + np.searchsorted(neg, pos, "right").sum())


class ProgressiveMetrics:
    """Sliding-window and cumulative prequential metrics in bounded memory.

    ``retain`` (at least ``window``) samples are kept exactly; the buffer holds at most twice that.
    """

    def __init__(self, window: int = 20_000, retain: int = 2_000_000):
        self.window = window
        self.retain = max(retain, window)
        self._reset()

    def _reset(self) -> None:
        # Retained samples: buf[max(0, end - retain):end]. Appends go into buffers grown by doubling
        # up to 2 * retain; when full, the newest ``retain`` move to the front (one copy per
        # ``retain`` samples: amortised O(1) per sample).
        self._scores = np.zeros(0, dtype=np.float32)
        self._labels = np.zeros(0, dtype=np.int8)
        self._ts = np.zeros(0, dtype=np.int64)  # event time of each prediction: AUC over any time range
        self._end = 0
        self._total = 0
        self._invalid = 0  # scores that were NaN or outside [0, 1] (clipped)
        self._loss_sum = 0.0
        self._score_sum = 0.0
        self._hist_pos = np.zeros(NBINS, dtype=np.int64)
        self._hist_neg = np.zeros(NBINS, dtype=np.int64)
        self._lo, self._hi = NBINS, 0  # occupied bins lie in [lo, hi): a report scans only those
        # Exact cumulative AUC while every sample is retained: twice the Mann-Whitney count, kept
        # incrementally against sorted runs of earlier scores (sizes roughly doubling, merged like
        # a binary counter), so neither an update nor a report sorts the stream. None once beyond.
        self._runs: list[tuple[np.ndarray, np.ndarray]] | None = []
        self._u2 = 0

    @property
    def _start(self) -> int:
        return max(0, self._end - self.retain)

    scores = property(lambda self: self._scores[self._start:self._end])
    labels = property(lambda self: self._labels[self._start:self._end])
    ts = property(lambda self: self._ts[self._start:self._end])

    @property
    def count(self) -> int:
        """Samples seen since the stream began (not only the retained ones)."""
        return self._total

    @property
    def recent(self) -> int:
        """How many of the trailing retained samples form the window (<= window)."""
        return min(self.window, self._end - self._start)

    def update(self, scores: np.ndarray, labels: np.ndarray, ts: np.ndarray) -> None:
        """Add one scored batch; O(batch) amortised."""
        s, invalid = _clean(scores)
        y = np.asarray(labels).reshape(-1) > 0
        t = np.asarray(ts, dtype=np.int64).reshape(-1)
        k = len(s)
        if not k:
            return
        self._invalid += invalid
        self._total += k
        self._loss_sum += logloss(y, s) * k
        self._score_sum += float(s.sum(dtype=np.float64))
        bins = s.view(np.uint32) >> _SHIFT
        self._lo, self._hi = min(self._lo, int(bins.min())), max(self._hi, int(bins.max()) + 1)
        np.add.at(self._hist_pos, bins[y], 1)
        np.add.at(self._hist_neg, bins[~y], 1)
        self._update_exact(s, y)
        self._append(s, y.astype(np.int8), t)

    def _update_exact(self, s: np.ndarray, y: np.ndarray) -> None:
        if self._runs is None:
            return
        if self._total > self.retain:  # no longer all retained: the histogram takes over
            self._runs = None
            return
        bp, bn = np.sort(s[y]), np.sort(s[~y])
        u2 = _pairs2(bp, bn)
        for rp, rn in self._runs:  # new positives above earlier negatives, earlier positives above new negatives
            u2 += _pairs2(bp, rn) + 2 * len(rp) * len(bn) - _pairs2(bn, rp)
        self._u2 += u2
        self._runs.append((bp, bn))
        while len(self._runs) > 1 and sum(map(len, self._runs[-2])) <= 2 * sum(map(len, self._runs[-1])):
            (p1, n1), (p2, n2) = self._runs.pop(), self._runs.pop()
            self._runs.append((np.sort(np.concatenate([p2, p1])), np.sort(np.concatenate([n2, n1]))))

    def _append(self, s: np.ndarray, y: np.ndarray, t: np.ndarray) -> None:
        k, r = len(s), self.retain
        if k >= r:  # a batch longer than what is kept: only its tail survives
            s, y, t, k, self._end = s[-r:], y[-r:], t[-r:], r, 0
        if self._end + k > 2 * r:  # full: the newest ``retain`` move to the front
            for a in (self._scores, self._labels, self._ts):
                a[:r] = a[self._end - r:self._end]
            self._end = r
        end = self._end + k
        if end > len(self._scores):
            cap = min(max(end, 2 * len(self._scores), 1024), 2 * r)
            self._scores, self._labels, self._ts = (np.concatenate([a[:self._end], np.empty(cap - self._end, a.dtype)])
                                                    for a in (self._scores, self._labels, self._ts))
        self._scores[self._end:end], self._labels[self._end:end], self._ts[self._end:end] = s, y, t
        self._end = end

    def _histogram_auc(self) -> tuple[float, float]:
        """(AUC, worst-case error): pairs in different bins are ordered exactly, pairs sharing a
        bin count 1/2 as ties; the exact AUC is within half the share of same-bin pairs."""
        span = slice(self._lo, self._hi)
        pos, neg = self._hist_pos[span].astype(np.float64), self._hist_neg[span].astype(np.float64)
        p, n = float(pos.sum()), float(neg.sum())
        if p == 0 or n == 0:
            return float("nan"), 0.0
        same = float(pos @ neg)
        below = float(pos @ (np.cumsum(neg) - neg))
        return (below + same / 2) / (p * n), same / (2 * p * n)

    def summary(self) -> dict[str, float]:
        """auc_window, auc_cumulative, logloss_window, ctr_predicted/actual_window, samples (ever
        seen), then auc_cumulative_tie_bound (0 while exact), logloss_cumulative,
        ctr_predicted/actual_cumulative and invalid_scores_cumulative (NaN or outside [0, 1])."""
        if not self._total:
            return {}
        ws, wl = self.scores[-self.recent:], self.labels[-self.recent:]
        positives = int(self._hist_pos.sum())
        if self._runs is not None:
            negatives = self._total - positives
            cumulative = self._u2 / (2 * positives * negatives) if positives and negatives else float("nan")
            bound = 0.0
        else:
            cumulative, bound = self._histogram_auc()
        return {
            "auc_window": auc(wl, ws),
            "auc_cumulative": cumulative,
            "logloss_window": logloss(wl, ws),
            "ctr_predicted_window": float(ws.mean()),
            "ctr_actual_window": float(wl.mean()),
            "samples": float(self._total),
            "auc_cumulative_tie_bound": bound,
            "logloss_cumulative": self._loss_sum / self._total,
            "ctr_predicted_cumulative": self._score_sum / self._total,
            "ctr_actual_cumulative": positives / self._total,
            "invalid_scores_cumulative": float(self._invalid),
        }

    def state(self) -> dict[str, np.ndarray]:
        """Retained samples, the occupied histogram bins and the running sums, as numeric arrays."""
        occupied = np.flatnonzero(self._hist_pos | self._hist_neg)
        return {"scores": self.scores, "labels": self.labels, "ts": self.ts,
                "hist_bins": occupied, "hist_pos": self._hist_pos[occupied], "hist_neg": self._hist_neg[occupied],
                "counts": np.array([self._total, self._invalid], dtype=np.int64),
                "sums": np.array([self._loss_sum, self._score_sum], dtype=np.float64)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state`; an older checkpoint (every sample, no histogram) is replayed."""
        self._reset()
        scores = np.asarray(state["scores"], dtype=np.float32)
        labels = np.asarray(state["labels"], dtype=np.int8)
        ts = np.asarray(state.get("ts", np.zeros(len(labels))), dtype=np.int64)
        if "hist_bins" not in state:
            self.update(scores, labels, ts)
            return
        self._total, self._invalid = (int(v) for v in state["counts"])
        self._loss_sum, self._score_sum = (float(v) for v in state["sums"])
        bins = np.asarray(state["hist_bins"], dtype=np.int64)
        self._hist_pos[bins], self._hist_neg[bins] = state["hist_pos"], state["hist_neg"]
        if len(bins):
            self._lo, self._hi = int(bins.min()), int(bins.max()) + 1
        self._append(scores[-self.retain:], labels[-self.retain:], ts[-self.retain:])
        if len(scores) == self._total <= self.retain:  # every sample is here: the exact count again
            y = labels > 0
            self._runs = [(np.sort(scores[y]), np.sort(scores[~y]))]
            self._u2 = _pairs2(*self._runs[0])
        else:
            self._runs = None
