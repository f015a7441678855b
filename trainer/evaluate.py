"""Offline and prequential evaluation on a time-ordered list of samples.

Chronological split: the last 10 % of events by time is the test part (events sharing the cut-off
timestamp all go to test). ``offline``: shuffled epochs over the train part minus its last 10 %
(by time), early stopping on that end of the train part, AUC on the test part. ``prequential``:
one pass in time order; every batch is scored before it is learned, and a batch is scored only by
a model that has learned from events STRICTLY earlier than the batch's first event (events sharing
a timestamp never teach each other: a streaming trainer learns a sample after its label is known);
the test AUC is over the test part's predictions, made while the model keeps learning.
``counters``: the streaming-counter baseline (smoothed user and item click rates so far, combined by
a logistic fit on the end of the train part).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from trainer.features import Batch, samples_to_batch

TEST_FRACTION = 0.1
VALID_FRACTION = 0.1


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (rank statistic, ties get their average rank). NaN with one class only."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    pos = y.sum()
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def chronological_split(ts: np.ndarray, fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of time-sorted ``ts``: the last ``fraction`` by time is test."""
    n = len(ts)
    cut = ts[min(int(n * (1 - fraction)), n - 1)]
    first_test = int(np.searchsorted(ts, cut, side="left"))
    return np.arange(first_test), np.arange(first_test, n)


@dataclass
class RunResult:
    seed: int
    test_auc: float
    test_logloss: float
    extra: dict[str, float] = field(default_factory=dict)


def _predict_np(model, batch: Batch, device) -> np.ndarray:
    from trainer.model import predict

    return predict(model, batch.to_torch(device)).cpu().numpy()


def _predict_all(model, data: Batch, idx: np.ndarray, bs: int, device) -> np.ndarray:
    return np.concatenate([_predict_np(model, data.slice(idx[i:i + bs]), device)
                           for i in range(0, len(idx), bs)]) if len(idx) else np.zeros(0)


def prequential(model, opts, data: Batch, ts: np.ndarray, bs: int, device,
                on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """One pass in time order; returns every sample's prediction made before it was learned."""
    from trainer.model import train_step

    n = len(ts)
    preds = np.zeros(n, dtype=np.float32)
    learned = 0  # samples [0, learned) are learned
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        # learn everything strictly earlier than this batch's first event, in full batches
        ready = int(np.searchsorted(ts, ts[start], side="left"))
        while ready - learned >= bs:  # a partial remainder waits (at most bs samples) for more
            train_step(model, opts, data.slice(slice(learned, learned + bs)).to_torch(device))
            learned += bs
        preds[start:stop] = _predict_np(model, data.slice(slice(start, stop)), device)
        if on_step:
            on_step(stop)
    return preds


def offline(model, opts, data: Batch, train_idx: np.ndarray, valid_idx: np.ndarray, bs: int, device,
            rng: np.random.Generator, max_epochs: int = 5, patience: int = 1,
            evals_per_epoch: int = 2) -> tuple[Any, dict[str, float]]:
    """Shuffled epochs with early stopping on ``valid_idx``; returns the best model and stats."""
    from trainer.model import train_step

    best_auc, best_state, bad, evals = -1.0, None, 0, 0
    steps_per_eval = max(1, math.ceil(len(train_idx) / bs / evals_per_epoch))
    for epoch in range(max_epochs):
        perm = rng.permutation(train_idx)
        stop = False
        for k, i in enumerate(range(0, len(perm), bs)):
            train_step(model, opts, data.slice(np.sort(perm[i:i + bs])).to_torch(device))
            if (k + 1) % steps_per_eval == 0 or i + bs >= len(perm):
                evals += 1
                p = _predict_all(model, data, valid_idx, 4 * bs, device)
                a = auc(data.label[valid_idx], p)
                if a > best_auc + 1e-5:
                    best_auc, best_state, bad = a, copy.deepcopy(model.state_dict()), 0
                else:
                    bad += 1
                    if bad > patience:
                        stop = True
                        break
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"valid_auc": best_auc, "evals": evals, "epochs": epoch + 1}


def counters_baseline(data: Batch, fit_idx: np.ndarray, steps: int = 200) -> Callable[[np.ndarray], np.ndarray]:
    """Logistic regression on the counter features, fit on ``fit_idx`` (Newton steps)."""
    def design(idx):
        x = data.dense[idx].astype(np.float64)
        return np.concatenate([x[:, [6, 7]], np.ones((len(idx), 1))], axis=1)  # logit rates + bias

    X, y = design(fit_idx), data.label[fit_idx].astype(np.float64)
    w = np.zeros(X.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-X @ w))
        g = X.T @ (p - y)
        H = X.T @ (X * (p * (1 - p))[:, None]) + 1e-6 * np.eye(len(w))
        dw = np.linalg.solve(H, g)
        w -= dw
        if np.abs(dw).max() < 1e-10:
            break
    return lambda idx: 1 / (1 + np.exp(-design(idx) @ w))


def evaluate(samples: Sequence[Any], settings: Any, model_kind: str = "dmr", ablate: Sequence[str] = (),
             mode: str = "prequential", seeds: Sequence[int] = (0, 1, 2), max_epochs: int = 5,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``model_kind`` (dmr|din|lr|counters) over ``samples`` (any order; sorted by time here)
    for each seed; returns a JSON-able summary with mean and std of the test AUC and logloss."""
    import torch

    from trainer.model import build_model, build_optimizers, pick_device

    samples = sorted(samples, key=lambda s: s.ts)
    t0 = time.perf_counter()
    data = samples_to_batch(samples, settings)
    ts = np.array([s.ts for s in samples], dtype=np.int64)
    train_idx, test_idx = chronological_split(ts)
    fit_idx, valid_idx = chronological_split(ts[train_idx], VALID_FRACTION)
    log(f"{len(samples)} samples ({data.label.mean():.3f} positive): train {len(fit_idx)} + valid "
        f"{len(valid_idx)}, test {len(test_idx)}; batch built in {time.perf_counter() - t0:.1f}s")
    device = pick_device(settings)
    bs = settings.model.batch_size
    y_test = data.label[test_idx]
    runs: list[RunResult] = []
    for seed in seeds:
        t1 = time.perf_counter()
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        extra: dict[str, float] = {}
        if model_kind == "counters":
            p = counters_baseline(data, valid_idx)(test_idx)
        else:
            model = build_model(settings, model_kind, ablate).to(device)
            opts = build_optimizers(model, settings)
            if mode == "prequential":
                preds = prequential(model, opts, data, ts, bs, device)
                p = preds[test_idx]
                extra["train_part_prequential_auc"] = auc(data.label[train_idx], preds[train_idx])
            elif mode == "offline":
                model, extra = offline(model, opts, data, fit_idx, valid_idx, bs, device, rng, max_epochs)
                p = _predict_all(model, data, test_idx, 4 * bs, device)
            else:
                raise ValueError(f"unknown mode {mode!r}")
        extra["seconds"] = time.perf_counter() - t1
        r = RunResult(seed, auc(y_test, p), logloss(y_test, p), extra)
        runs.append(r)
        log(f"seed {seed}: test AUC {r.test_auc:.4f} logloss {r.test_logloss:.4f} "
            + " ".join(f"{k}={v:.4g}" for k, v in extra.items()))
    aucs = np.array([r.test_auc for r in runs])
    lls = np.array([r.test_logloss for r in runs])
    return {
        "model": model_kind, "ablate": list(ablate), "mode": mode, "seeds": list(seeds),
        "n_samples": len(samples), "n_test": int(len(test_idx)),
        "test_auc_mean": float(aucs.mean()), "test_auc_std": float(aucs.std()),
        "test_logloss_mean": float(lls.mean()), "test_logloss_std": float(lls.std()),
        "runs": [r.__dict__ for r in runs],
        "settings": {"model": settings.model.model_dump(), "features": settings.features.model_dump()},
    }


def load_samples(path: str, seq_len: int, limit: int | None = None) -> list[Any]:
    """MovieLens 100K directory or Alimama 267-column file -> samples."""
    from pathlib import Path

    from trainer.importers import alimama_samples, movielens_samples

    p = Path(path)
    if p.is_dir() and (p / "ml-100k.inter").is_file():
        return movielens_samples(p, seq_len, limit)
    if p.is_file():
        out = list(alimama_samples(p))
        return out[:limit] if limit else out
    raise FileNotFoundError(f"{path}: neither a MovieLens 100K directory nor an Alimama file")
