"""samples_to_batch: stable hashing, left padding, positions, counters, columns == samples."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from dmrstream.contracts import Sample
from dmrstream.settings import load_settings
from trainer.features import (COUNTER_KEYS, NUM_DENSE, columns_to_batch, hash_ids, samples_to_batch,
                              time_gap_bucket)

S = load_settings(overrides={"features.seq_len": 4, "model.item_vocab_size": 1000})


def sample(i, hist, **kw):
    n = len(hist)
    return Sample(sample_id=f"s{i}", event_id=f"e{i}", user_id=i, item_id=kw.pop("item", 5), category_id="c",
                  ts=10**12, label=1, hist_item_ids=hist, hist_category_ids=["c"] * n,
                  hist_behaviors=kw.pop("beh", ["click"] * n), hist_ts=[10**12 - 1000 * (n - j) for j in range(n)], **kw)


def test_hash_is_stable_across_processes_and_in_range():
    ids = [0, 1, 12345678901234, "abc", "5", 5]
    rows = hash_ids(ids, 1000, "item")
    assert rows.min() >= 1 and rows.max() < 1000  # row 0 is padding
    assert rows[4] == rows[5]  # "5" and 5 are the same id
    code = ("from trainer.features import hash_ids; "
            "print([int(r) for r in hash_ids([0, 1, 12345678901234, 'abc', '5', 5], 1000, 'item')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert out.stdout.strip() == str([int(r) for r in rows])
    assert not np.array_equal(hash_ids([1, 2, 3], 1000, "item"), hash_ids([1, 2, 3], 1000, "category"))


def test_left_padding_most_recent_last_and_truncation():
    b = samples_to_batch([sample(0, []), sample(1, [7, 8]), sample(2, [1, 2, 3, 4, 5, 6])], S)
    assert b.hist_item.shape == (3, 4)
    assert b.mask.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert b.hist_item[0].tolist() == [0, 0, 0, 0]
    assert b.hist_item[1, 3] == hash_ids([8], 1000, "item")[0]  # most recent last
    assert b.hist_item[2].tolist() == hash_ids([3, 4, 5, 6], 1000, "item").tolist()  # the last T kept
    assert b.hist_position[1].tolist() == [0, 0, 1, 0] and b.hist_position[2].tolist() == [3, 2, 1, 0]


def test_behaviours_gaps_fields_and_counters():
    s = sample(0, [1, 2], beh=["cart", "buy"], user_profile={"age": 3, "gender": "F"},
               counters={"user_impressions": 4, "user_clicks": 2, "item_impressions": 0, "item_clicks": 0})
    b = samples_to_batch([s, sample(1, [3])], S)
    assert b.hist_behavior[0, -2:].tolist() == [2, 4]
    assert b.hist_gap[0, -1] == time_gap_bucket(np.array([1000]), 16)[0] and b.hist_gap[0, 0] == 0
    assert (b.profile[0, :2] > 0).all() and (b.profile[0, 2:] == 0).all() and (b.profile[1] == 0).all()
    assert b.dense.shape == (2, NUM_DENSE)
    assert b.dense[0, 0] == np.float32(np.log1p(4)) and b.dense[0, -1] == 1.0
    assert (b.dense[1] == 0).all()  # no counters: zero features and the "present" flag off


def test_columns_with_counter_array_equal_samples():
    samples = [sample(i, list(range(i)), counters=dict(zip(COUNTER_KEYS, [i, i / 2, 3, 1]))) for i in range(6)]
    b1 = samples_to_batch(samples, S)
    cols = {"user_id": [s.user_id for s in samples], "item_id": [s.item_id for s in samples],
            "category_id": ["c"] * 6, "ts": [s.ts for s in samples], "label": [1] * 6,
            "hist_item_ids": [s.hist_item_ids for s in samples], "hist_category_ids": [s.hist_category_ids for s in samples],
            "hist_behaviors": [s.hist_behaviors for s in samples], "hist_ts": [s.hist_ts for s in samples],
            "counters": np.array([[s.counters[k] for k in COUNTER_KEYS] for s in samples])}
    b2 = columns_to_batch(cols, S)
    for name in ("user", "item", "hist_item", "mask", "hist_position", "hist_gap", "dense"):
        assert np.array_equal(getattr(b1, name), getattr(b2, name)), name


def test_field_rows_do_not_depend_on_which_equal_value_came_first():
    """1, 1.0 and True compare equal in Python but are different feature values ("x=1", "x=1.0",
    "x=True"): a cache keyed by equality once gave the row of whichever was hashed first."""
    from trainer.features import _field_key, hash_field_maps

    def rows(order):
        _field_key.cache_clear()
        return {repr(v): int(hash_field_maps([{"x": v}], 1, 1 << 20)[0, 0]) for v in order}

    forwards, backwards = rows([1, 1.0, True]), rows([True, 1.0, 1])
    assert forwards == backwards
    assert len(set(forwards.values())) == 3
