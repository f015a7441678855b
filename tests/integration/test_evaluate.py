"""dmrstream evaluate: AUC/logloss, chronological split, prequential order, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from dmrstream.cli import app
from trainer.evaluate import auc, chronological_split, logloss, prequential
from trainer.features import Batch


def test_auc_is_exact_with_ties():
    assert auc([0, 1], [0.1, 0.9]) == 1.0 and auc([1, 0], [0.1, 0.9]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 300), rng.integers(0, 5, 300).astype(float)
    pairs = [(a > b) + 0.5 * (a == b) for a, ya in zip(s, y) if ya for b, yb in zip(s, y) if not yb]
    assert abs(auc(y, s) - np.mean(pairs)) < 1e-12
    assert np.isnan(auc([1, 1], [0.2, 0.3]))
    assert abs(logloss([1, 0], [0.5, 0.5]) - np.log(2)) < 1e-9


def test_chronological_split_keeps_a_timestamp_on_one_side():
    ts = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 10])
    train, test = chronological_split(ts, 0.25)
    assert ts[train].max() < ts[test].min() and set(ts[test]) == {9, 10}


class Recorder(torch.nn.Module):
    """A fake model that records, per step, which samples it learned and was asked to score."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.learned: list[int] = []
        self.scored_after: list[tuple[list[int], int]] = []
        self.cfg = type("C", (), {"aux_weight": 0.0})()

    def forward(self, b):
        ids = b.user.tolist()
        if self.training:
            self.learned += ids
        else:
            self.scored_after.append((ids, len(self.learned)))
        return self.w.expand(len(ids)), {}


def test_prequential_scores_before_learning_and_never_learns_same_timestamp_first():
    ts = np.array([1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 6])
    n = len(ts)
    z = np.zeros((n, 1), dtype=np.int64)
    data = Batch(user=np.arange(n), item=np.zeros(n, np.int64), category=np.zeros(n, np.int64), hist_item=z,
                 hist_category=z, hist_behavior=z, hist_position=z, hist_gap=z, mask=np.zeros((n, 1), np.float32),
                 profile=z, context=z, item_fields=z, dense=np.zeros((n, 1), np.float32),
                 display_position=np.zeros(n, np.int64), label=np.zeros(n, np.float32))
    model = Recorder()
    opts = type("O", (), {"zero_grad": lambda self: None, "step": lambda self: None})()
    preds = prequential(model, opts, data, ts, 2, "cpu")
    assert len(preds) == n
    learned_ts = ts[np.array(model.learned)]
    for ids, n_learned in model.scored_after:
        # everything learned before scoring is strictly earlier than every scored sample
        assert n_learned == 0 or learned_ts[:n_learned].max() < ts[ids].min()
    assert model.learned == sorted(model.learned)  # one pass in time order


def test_evaluate_cli_on_a_movielens_subset(movielens_dir, tmp_path):
    out = tmp_path / "r.json"
    sets = ["--set", "model.item_vocab_size=4096", "--set", "model.user_vocab_size=4096",
            "--set", "model.mlp_hidden=[32,16]", "--set", "model.aux_negatives=100", "--set", "features.seq_len=10"]
    runner = CliRunner()
    res = runner.invoke(app, [*sets, "evaluate", "--data", str(movielens_dir), "--model", "dmr", "--ablate",
                              "i2i", "--mode", "prequential", "--seeds", "2", "--limit", "3000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["mode"] == "prequential" and r["ablate"] == ["i2i"] and len(r["runs"]) == 2
    assert 0.5 < r["test_auc_mean"] <= 1 and r["test_logloss_mean"] > 0
    res = runner.invoke(app, [*sets, "evaluate", "--data", str(movielens_dir), "--model", "lr", "--mode", "offline",
                              "--seeds", "1", "--epochs", "2", "--limit", "3000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["runs"][0]["extra"]["evals"] >= 1
    res = runner.invoke(app, [*sets, "evaluate", "--data", str(movielens_dir), "--model", "counters",
                              "--seeds", "1", "--limit", "3000"])
    assert res.exit_code == 0 and "test AUC" in res.output
