"""Prequential metrics: appends are kept exactly, in order, across buffer growth and a
checkpoint round trip; window and cumulative figures come from the right samples."""

from __future__ import annotations

import numpy as np

from trainer.evaluate import auc
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
