"""Trainer step throughput: DMR at batch 1024, T=50, embedding 32, 2^20-row item tables.

Compares, in the same process: the project's step (sparse embedding gradients + SparseAdam for the
tables, Adam for dense weights) against a plain PyTorch loop (dense embedding gradients, one dense
Adam over everything). Also times ``samples_to_batch`` (the input function), since the trainer
must reach 80 % of the pure step rate end to end. On CUDA (when present) it runs bf16 autocast with
pinned host batches and non-blocking copies. Run: ``python bench/train_step.py`` (no arguments).
Figures on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dmrstream.allocator import tune_allocator  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
import trainer.model as model_module  # noqa: E402
from trainer.features import columns_to_batch  # noqa: E402
from trainer.model import ModelConfig, build_model, build_optimizers, train_step  # noqa: E402

BATCH, T, DIM = 1024, 50, 32
BUDGET_S = float(os.environ.get("BENCH_SECONDS", "20"))  # per measured configuration


def make_columns(rng: np.random.Generator, n: int) -> dict:
    """Synthetic samples at the paper's shape: full sequences, Zipf-ish item popularity."""
    items = (rng.zipf(1.2, size=(n, T)) % 2_000_000).tolist()
    cats = (np.asarray(items) % 5000).tolist()
    beh = [["click"] * T for _ in range(n)]
    ts0 = 1_600_000_000_000
    return {
        "user_id": rng.integers(0, 10**7, n).tolist(), "item_id": (rng.zipf(1.2, n) % 2_000_000).tolist(),
        "category_id": rng.integers(0, 5000, n).tolist(), "ts": [ts0 + 10**6] * n,
        "label": rng.integers(0, 2, n).tolist(), "hist_item_ids": items, "hist_category_ids": cats,
        "hist_behaviors": beh, "hist_ts": [[ts0 + j for j in range(T)]] * n,
        "counters": rng.integers(0, 100, (n, 4)).astype(np.float64),
        "user_profile": [{"age": int(a), "gender": int(a) % 2} for a in rng.integers(0, 8, n)],
        "context": [{"pid": int(p)} for p in rng.integers(0, 3, n)],
    }


def measure(model, opts, batches, device, budget_s: float) -> float:
    """Samples per second of train_step over pre-built batches (after two warm-up steps)."""
    dev = [b.to_torch(device, non_blocking=True, pin=device.type == "cuda") for b in batches]
    for b in dev[:2]:
        train_step(model, opts, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        train_step(model, opts, dev[n % len(dev)])
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * BATCH / (time.perf_counter() - t0)


def main() -> None:
    tune_allocator()  # as every dmrstream process does (dmrstream/allocator.py)
    console = Console()
    settings = load_settings(overrides={"model.batch_size": BATCH, "features.seq_len": T,
                                        "model.embedding_dim": DIM})
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cols = [make_columns(rng, BATCH) for _ in range(4)]
    t0 = time.perf_counter()
    batches = [columns_to_batch(c, settings) for c in cols]
    features_rate = 4 * BATCH / (time.perf_counter() - t0)
    # The same samples with two behaviour types (clicks and carts): the U2I attention then takes
    # its generic form (one query per row and position) instead of one query per position.
    mixed = [columns_to_batch({**c, "hist_behaviors": [["click", "cart"] * (T // 2)] * BATCH}, settings) for c in cols]

    results: dict[str, float] = {"features_samples_per_s": round(features_rate)}
    table = Table("configuration", "device", "samples/s", "vs plain loop")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        cfg = ModelConfig.from_settings(settings, "dmr")
        plain = build_model(settings, config=ModelConfig(**{**cfg.__dict__, "sparse_embeddings": False})).to(device)
        plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

        class PlainOpts:  # the plain loop: dense gradients, one dense Adam over all weights
            zero_grad = staticmethod(lambda: plain_opt.zero_grad(set_to_none=True))
            step = staticmethod(plain_opt.step)

        # the plain loop is slow on CPU: a shorter budget keeps the whole bench under 5 minutes
        base = measure(plain, PlainOpts, batches, device, BUDGET_S / 2)
        del plain, plain_opt
        model = build_model(settings, "dmr").to(device)
        opts = build_optimizers(model, settings)
        ours = measure(model, opts, batches, device, BUDGET_S)
        ours_mixed = measure(model, opts, mixed, device, BUDGET_S / 2)
        # The same model with nn.Embedding called once per id tensor (before model.lookup): each
        # lookup's gradient has a row per occurrence, which SparseAdam's coalesce sorts and sums.
        distinct_lookup, model_module.lookup = model_module.lookup, lambda table, *ids: [table(i) for i in ids]
        try:
            per_occurrence = measure(model, opts, batches, device, BUDGET_S / 2)
        finally:
            model_module.lookup = distinct_lookup
        del model, opts
        tag = device.type
        results[f"plain_dense_adam_{tag}_samples_per_s"] = round(base)
        results[f"train_{tag}_samples_per_s"] = round(ours)
        results[f"speedup_{tag}_x"] = round(ours / base, 2)
        results[f"train_mixed_behaviors_{tag}_samples_per_s"] = round(ours_mixed)
        results[f"train_rows_per_occurrence_{tag}_samples_per_s"] = round(per_occurrence)
        table.add_row("plain loop, dense Adam", tag, f"{base:,.0f}", "1.00x")
        table.add_row("sparse tables + SparseAdam" + (" + bf16 AMP" if tag == "cuda" else ""), tag,
                      f"{ours:,.0f}", f"{ours / base:.2f}x")
        table.add_row("  the same, two behaviour types per sequence", tag, f"{ours_mixed:,.0f}", f"{ours_mixed / base:.2f}x")
        table.add_row("  the same, gradient rows per occurrence (one lookup per id tensor)", tag,
                      f"{per_occurrence:,.0f}", f"{per_occurrence / base:.2f}x")
    table.add_row("samples_to_batch (input function)", "cpu", f"{features_rate:,.0f}", "")
    console.print(f"DMR train step: batch {BATCH}, T={T}, embedding {DIM}, 2^20-row item tables, "
                  f"torch threads {torch.get_num_threads()} (shared machine: figures are noisy)")
    console.print(table)
    if not torch.cuda.is_available():
        console.print("no CUDA device here: the GPU figures are not measured")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
