"""Importers: MovieLens 100K point-in-time sequences and counters, Alimama 267-column rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from trainer.features import samples_to_batch
from trainer.importers import alimama_samples, movielens_samples
from dmrstream.settings import load_settings


def test_movielens_histories_and_counters_are_strictly_earlier(movielens_dir):
    samples = movielens_samples(movielens_dir, seq_len=50, limit=5000)
    assert len(samples) == 5000 and [s.ts for s in samples] == sorted(s.ts for s in samples)
    clicks = defaultdict(list)            # reference, recomputed naively: user -> [(ts, item)]
    imps_u, imps_i = defaultdict(list), defaultdict(list)
    for s in samples:
        assert all(t < s.ts for t in s.hist_ts)
        expect = [i for t, i in clicks[s.user_id] if t < s.ts][-50:]
        assert s.hist_item_ids == expect
        assert s.counters["user_impressions"] == sum(t < s.ts for t, _ in imps_u[s.user_id])
        assert s.counters["user_clicks"] == sum(t < s.ts and y for t, y in imps_u[s.user_id])
        assert s.counters["item_impressions"] == sum(t < s.ts for t, _ in imps_i[s.item_id])
        assert s.counters["item_clicks"] == sum(t < s.ts and y for t, y in imps_i[s.item_id])
        if s.label:
            clicks[s.user_id].append((s.ts, s.item_id))
        imps_u[s.user_id].append((s.ts, s.label))
        imps_i[s.item_id].append((s.ts, s.label))
    # the trap: same-timestamp ratings exist and never see each other
    same = [s for s in samples if any(t == s.ts for t, _ in imps_u[s.user_id] if t)]
    assert same
    s = samples[0]
    assert s.sample_id.startswith("ml100k:") and set(s.user_profile) == {"age", "gender", "occupation"}
    assert set(s.item_features) == {"genres", "year"}
    assert np.mean([x.label for x in samples]) > 0.4


def test_alimama_rows(alimama_file):
    samples = list(alimama_samples(alimama_file))
    assert len(samples) == 500 and sum(s.label for s in samples) == 210
    raw = [int(float(x)) for x in open(alimama_file).readline().strip().split(",")]
    s = samples[0]
    n_real = sum(raw[150:200])
    assert len(s.hist_item_ids) == n_real
    assert s.hist_item_ids[-1] == raw[149] and s.hist_category_ids[-1] == raw[99]  # index 49 = newest
    assert s.item_id == raw[263] and s.category_id == raw[260] and s.user_id == raw[250]
    assert s.context == {"pid": raw[265]} and s.item_features["adgroup_id"] == raw[259]
    assert all(t < s.ts for t in s.hist_ts)
    b = samples_to_batch(samples, load_settings())
    assert b.mask.sum() == sum(len(x.hist_item_ids) for x in samples)
