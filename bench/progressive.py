"""Prequential metrics at trainer scale: bounded retention + histogram vs keeping every sample.

Streams synthetic scored samples (10M by default, batches of 1024, ~5 % positives, scores with
signal) into ``trainer.progressive.ProgressiveMetrics`` (retain 2M) and, in the same process, into
the former unbounded version (inline below: every sample kept, ``summary()`` sorts them all).
Reports update time per batch, ``summary()`` time when the stream reaches ``retain`` and at the
end (the trainer calls it after every batch), allocated bytes, checkpoint state bytes, and the
histogram AUC's error against the exact AUC of the whole stream. Run: ``python bench/progressive.py``
(no arguments; ``BENCH_SAMPLES`` changes the stream length). Figures on a shared machine are noisy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.evaluate import auc, logloss  # noqa: E402
from trainer.progressive import ProgressiveMetrics  # noqa: E402

SAMPLES = int(os.environ.get("BENCH_SAMPLES", "10000000"))
BATCH, RETAIN = 1024, 2_000_000


class Unbounded:
    """The former ProgressiveMetrics: every (score, label, ts) kept; cumulative AUC sorts them all."""

    def __init__(self, window: int = 20_000):
        self.window, self.n = window, 0
        self.s, self.y, self.t = np.zeros(0, np.float32), np.zeros(0, np.int8), np.zeros(0, np.int64)

    def update(self, scores, labels, ts) -> None:
        k, end = len(scores), self.n + len(scores)
        if end > len(self.s):
            cap = max(end, 2 * len(self.s), 1024)
            self.s, self.y, self.t = (np.resize(a, cap) for a in (self.s, self.y, self.t))
        self.s[self.n:end], self.y[self.n:end], self.t[self.n:end] = scores, labels, ts
        self.n = end

    def summary(self) -> dict[str, float]:
        s, y = self.s[:self.n], self.y[:self.n]
        ws, wl = s[-self.window:], y[-self.window:]
        return {"auc_window": auc(wl, ws), "auc_cumulative": auc(y, s), "logloss_window": logloss(wl, ws),
                "ctr_predicted_window": float(ws.mean()), "ctr_actual_window": float(wl.mean()), "samples": float(self.n)}

    def state(self) -> dict[str, np.ndarray]:
        return {"scores": self.s[:self.n], "labels": self.y[:self.n], "ts": self.t[:self.n]}


def make_stream(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.05).astype(np.int8)
    logit = rng.normal(-3.0, 1.0, n).astype(np.float32) + np.float32(0.9) * y
    return (1 / (1 + np.exp(-logit))).astype(np.float32), y, np.arange(n, dtype=np.int64) + 1_700_000_000_000


def feed(m, stream, start: int, stop: int) -> float:
    """Seconds spent in update() for samples [start, stop)."""
    s, y, t = stream
    t0 = time.perf_counter()
    for i in range(start, stop, BATCH):
        j = min(i + BATCH, stop)
        m.update(s[i:j], y[i:j], t[i:j])
    return time.perf_counter() - t0


def timed_summary(m) -> tuple[dict[str, float], float]:
    t0 = time.perf_counter()
    out = m.summary()
    return out, (time.perf_counter() - t0) * 1e3


def allocated(m) -> int:
    if isinstance(m, Unbounded):
        return m.s.nbytes + m.y.nbytes + m.t.nbytes
    runs = sum(a.nbytes for r in (m._runs or []) for a in r)
    return m._scores.nbytes + m._labels.nbytes + m._ts.nbytes + m._hist_pos.nbytes + m._hist_neg.nbytes + runs


def main() -> None:
    console = Console()
    stream = make_stream(np.random.default_rng(0), SAMPLES)
    at = min(RETAIN, SAMPLES)
    figures = {}
    for name, m in (("new", ProgressiveMetrics(retain=RETAIN)), ("old", Unbounded())):
        took = feed(m, stream, 0, at)
        _, at_retain_ms = timed_summary(m)
        took += feed(m, stream, at, SAMPLES)
        summary, end_ms = timed_summary(m)
        figures[name] = {"update_us": took / -(-SAMPLES // BATCH) * 1e6, "at_retain_ms": at_retain_ms,
                         "end_ms": end_ms, "allocated": allocated(m),
                         "state": sum(a.nbytes for a in m.state().values()), "summary": summary}
        del m
    new, old = figures["new"], figures["old"]
    exact = old["summary"]["auc_cumulative"]
    got, bound = new["summary"]["auc_cumulative"], new["summary"]["auc_cumulative_tie_bound"]

    table = Table("measure", f"bounded (retain {RETAIN:,})", "unbounded (old)", "old / new")
    for label, key, fmt in (("update, µs per batch of 1024", "update_us", "{:,.1f}"),
                            (f"summary() at {at:,} samples, ms", "at_retain_ms", "{:,.1f}"),
                            (f"summary() at {SAMPLES:,} samples, ms", "end_ms", "{:,.1f}"),
                            ("allocated, MB", "allocated", "{:,.1f}"), ("checkpoint state, MB", "state", "{:,.1f}")):
        scale = 1e-6 if key in ("allocated", "state") else 1
        table.add_row(label, fmt.format(new[key] * scale), fmt.format(old[key] * scale), f"{old[key] / new[key]:.2f}x")
    table.add_row("cumulative AUC", f"{got:.6f} (bound ±{bound:.1e})", f"{exact:.6f} (exact)", f"error {abs(got - exact):.1e}")
    console.print(f"prequential metrics: {SAMPLES:,} samples in batches of {BATCH} (shared machine: figures are noisy)")
    console.print(table)
    print(json.dumps({
        "samples": SAMPLES, "retain_samples": RETAIN,
        "update_us_per_batch": round(new["update_us"], 1), "summary_at_retain_ms": round(new["at_retain_ms"], 2),
        "summary_ms": round(new["end_ms"], 2), "allocated_bytes": new["allocated"], "state_bytes": new["state"],
        "auc_cumulative": round(got, 6), "auc_exact": round(exact, 6), "auc_abs_error": abs(got - exact),
        "auc_tie_bound": bound,
        "baseline_update_us_per_batch": round(old["update_us"], 1),
        "baseline_summary_at_retain_ms": round(old["at_retain_ms"], 2), "baseline_summary_ms": round(old["end_ms"], 2),
        "baseline_allocated_bytes": old["allocated"], "baseline_state_bytes": old["state"]}))


if __name__ == "__main__":
    main()
