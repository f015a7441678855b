"""Prequential metrics: appends are kept exactly, in order, across buffer growth and a
checkpoint round trip; window and cumulative figures come from the right samples; memory and
state stay bounded by the retention while cumulative figures still cover the whole stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.evaluate import auc, logloss
from trainer.progressive import ProgressiveMetrics


def test_appends_kept_in_order_across_growth_and_checkpoint():
    rng = np.random.default_rng(0)
    m = ProgressiveMetrics(window=500)
    parts = []
    for i in range(60):  # uneven batches, past several buffer doublings
        k = int(rng.integers(0, 400))
        batch = (rng.random(k).astype(np.float32), rng.integers(0, 2, k), np.arange(k, dtype=np.int64) + 10_000 * i)
        m.update(*batch)
        parts.append(batch)
    scores, labels, ts = (np.concatenate([p[j] for p in parts]) for j in range(3))
    assert m.count == len(scores) > 5_000
    assert np.array_equal(m.scores, scores) and np.array_equal(m.labels, labels) and np.array_equal(m.ts, ts)
    s = m.summary()
    assert s["auc_cumulative"] == auc(labels, scores)
    assert s["auc_window"] == auc(labels[-500:], scores[-500:]) and m.recent == 500

    restored = ProgressiveMetrics(window=500)
    restored.load({k: v.copy() for k, v in m.state().items()})
    restored.update(np.array([0.9], np.float32), np.array([1]), np.array([7], np.int64))
    assert restored.count == m.count + 1 and m.count == len(scores)  # independent of the original
    assert np.array_equal(restored.scores[:-1], scores) and restored.ts[-1] == 7


def _stream(rng: np.random.Generator, n: int, batch: int = 300, distinct: int | None = None):
    """Uneven batches of (score, label, ts) with real signal: positives score higher on average."""
    out, done = [], 0
    while done < n:
        k = min(int(rng.integers(1, 2 * batch)), n - done)
        y = (rng.random(k) < 0.2).astype(np.int64)
        s = 1 / (1 + np.exp(-(rng.normal(-1.5, 1.0, k) + 1.2 * y)))
        if distinct:  # multiples of 1/distinct: exactly representable, every value in its own bin
            s = np.round(s * distinct) / distinct
        out.append((s.astype(np.float32), y, np.arange(done, done + k, dtype=np.int64)))
        done += k
    return out


def _concat(batches):
    return tuple(np.concatenate([b[j] for b in batches]) for j in range(3))


def test_retention_bounds_memory_and_state():
    rng = np.random.default_rng(1)
    retain = 1_000
    m = ProgressiveMetrics(window=100, retain=retain)
    long = (rng.random(2_500).astype(np.float32), rng.integers(0, 2, 2_500), np.arange(2_500, dtype=np.int64))
    batches = _stream(rng, 15_000) + [long] + _stream(rng, 15_000)  # one batch longer than retain
    seen = []
    for b in batches:
        m.update(*b)
        seen.append(b)
        scores, labels, ts = _concat(seen)
        assert m.count == len(scores)
        assert len(m._scores) <= 2 * retain  # capacity, not only the reported span
        assert np.array_equal(m.scores, scores[-retain:]) and np.array_equal(m.labels, labels[-retain:])
        assert np.array_equal(m.ts, ts[-retain:])
    state = m.state()
    assert all(len(state[k]) == retain for k in ("scores", "labels", "ts"))
    assert sum(a.nbytes for a in state.values()) < retain * 13 + 3 * 8 * len(state["hist_bins"]) + 100
    assert m.summary()["samples"] == m.count == 32_500


def test_cumulative_auc_exact_within_retain_then_within_tie_bound():
    rng = np.random.default_rng(2)
    m = ProgressiveMetrics(window=500, retain=5_000)
    seen = []
    for b in _stream(rng, 60_000):
        m.update(*b)
        seen.append(b)
        scores, labels, _ = _concat(seen)
        s = m.summary()
        if m.count <= 5_000:  # every sample retained: the exact rank statistic, to the bit
            assert s["auc_cumulative"] == auc(labels, scores) and s["auc_cumulative_tie_bound"] == 0.0
    exact = auc(labels, scores)
    assert 0.7 < exact < 0.9
    assert 0 < s["auc_cumulative_tie_bound"] < 2e-4
    assert abs(s["auc_cumulative"] - exact) <= s["auc_cumulative_tie_bound"]
    assert s["auc_window"] == auc(labels[-500:], scores[-500:])  # the window from retained samples


def test_histogram_auc_exact_with_few_distinct_scores():
    # Equal scores share a bin and count 1/2, as the exact statistic counts ties; distinct
    # multiples of 1/64 never share one: no approximation, though the bound cannot know it.
    rng = np.random.default_rng(3)
    m = ProgressiveMetrics(window=100, retain=1_000)
    for b in (batches := _stream(rng, 20_000, distinct=64)):
        m.update(*b)
    scores, labels, _ = _concat(batches)
    s = m.summary()
    assert s["auc_cumulative_tie_bound"] > 1e-3
    assert s["auc_cumulative"] == pytest.approx(auc(labels, scores), abs=1e-12)


def test_cumulative_logloss_and_click_rates_cover_the_whole_stream():
    rng = np.random.default_rng(4)
    m = ProgressiveMetrics(window=100, retain=1_000)
    for b in (batches := _stream(rng, 20_000)):
        m.update(*b)
    scores, labels, _ = _concat(batches)
    s = m.summary()
    assert s["logloss_cumulative"] == pytest.approx(logloss(labels, scores), rel=1e-9)
    assert s["ctr_predicted_cumulative"] == pytest.approx(scores.astype(np.float64).mean(), rel=1e-9)
    assert s["ctr_actual_cumulative"] == labels.mean()
    assert s["logloss_window"] == logloss(labels[-100:], scores[-100:])
    assert s["ctr_predicted_window"] == float(scores[-100:].mean()) and s["ctr_actual_window"] == labels[-100:].mean()


def _through_checkpoint(tmp_path, m: ProgressiveMetrics) -> dict[str, np.ndarray]:
    """The state as the trainer's checkpoint writes and reads it (safetensors)."""
    save_checkpoint(tmp_path, torch.nn.Linear(1, 1), {}, {}, m.state())
    return load_checkpoint(tmp_path)[3]


@pytest.mark.parametrize("stop_at", [3_000, 12_000])  # within retain (exact AUC), beyond it (histogram)
def test_restored_then_continued_equals_uninterrupted(tmp_path, stop_at):
    rng = np.random.default_rng(5)
    batches = _stream(rng, 20_000)
    cut = int(np.searchsorted(np.cumsum([len(b[0]) for b in batches]), stop_at))
    whole, first = ProgressiveMetrics(window=200, retain=4_000), ProgressiveMetrics(window=200, retain=4_000)
    for b in batches[:cut]:
        whole.update(*b)
        first.update(*b)
    restored = ProgressiveMetrics(window=200, retain=4_000)
    restored.load(_through_checkpoint(tmp_path, first))
    assert restored.summary() == whole.summary()
    for b in batches[cut:]:
        whole.update(*b)
        restored.update(*b)
        assert restored.summary() == whole.summary()
    assert np.array_equal(restored.scores, whole.scores) and np.array_equal(restored.ts, whole.ts)


@pytest.mark.parametrize("n", [3_000, 12_000])
def test_old_checkpoint_of_every_sample_is_replayed(n):
    rng = np.random.default_rng(6)
    batches = _stream(rng, n)
    scores, labels, ts = _concat(batches)
    whole = ProgressiveMetrics(window=200, retain=4_000)
    for b in batches:
        whole.update(*b)
    restored = ProgressiveMetrics(window=200, retain=4_000)
    restored.load({"scores": scores, "labels": labels.astype(np.int8), "ts": ts})  # before retention
    assert restored.count == n and len(restored.scores) == min(n, 4_000)
    assert np.array_equal(restored.scores, whole.scores) and np.array_equal(restored.ts, whole.ts)
    got, want = restored.summary(), whole.summary()
    assert got == pytest.approx(want, rel=1e-12)  # the sums add up in another order
    assert got["auc_cumulative"] == want["auc_cumulative"] and (n > 4_000) == (got["auc_cumulative_tie_bound"] > 0)


def test_invalid_scores_are_clipped_and_counted(tmp_path):
    m = ProgressiveMetrics(window=10, retain=10)
    bad = np.array([np.nan, np.inf, -np.inf, -3.0, 2.0, -0.0, 0.0, 1.0], dtype=np.float32)
    for _ in range(3):  # past retain: the histogram sees them too
        m.update(bad, np.array([1, 0, 1, 0, 1, 0, 1, 0]), np.arange(8))
    s = m.summary()
    assert all(np.isfinite(v) for v in s.values()), s
    assert s["invalid_scores_cumulative"] == 15 and s["samples"] == 24
    assert m.scores.min() == 0 and m.scores.max() == 1 and not np.signbit(m.scores).any()
    restored = ProgressiveMetrics(window=10, retain=10)
    restored.load(_through_checkpoint(tmp_path, m))
    assert restored.summary() == s
    old = ProgressiveMetrics(window=10, retain=10)
    old.load({"scores": np.tile(bad, 3), "labels": np.tile(np.int8([1, 0]), 12), "ts": np.arange(24)})
    assert old.summary()["invalid_scores_cumulative"] == 15
