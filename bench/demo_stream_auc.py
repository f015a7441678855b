"""Learning speed on the demo's stream, offline and reproducible (not a test).

The demo test's simulated stream (2,000 users, 5,000 items, seed 1, 300 events/s, 110 s) goes
through the streamer's processor (event-time order, 10 s window, real RocksDB store), and its
samples, in the order the join emits them (with the demo's ``join.positives_at=click``: positives
at the click, negatives when the window closes; ``POSITIVES_AT=window_close`` in the environment
for the product default), are learned prequentially by the demo's model: each batch scored before it is learned.
Compared in the same run: the output/position biases at their own step (`model.bias_learning_rate`
0.02, the default) against the dense step (what the model had before), and the item-popularity
baseline over the same impressions.

    .venv/bin/python bench/demo_stream_auc.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmrstream.contracts import Codec, Impression, Sample, encode  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from featurestore import open_partition_store  # noqa: E402
from monitoring.demo import DEMO_SETS, EVENTS_PER_SESSION  # noqa: E402
from replay.evaluate import ReferenceAUCs  # noqa: E402
from replay.simulate import SimConfig, simulate  # noqa: E402
from streamer.processor import PartitionProcessor, Record  # noqa: E402
from trainer.evaluate import auc, prequential  # noqa: E402
from trainer.features import samples_to_batch  # noqa: E402
from trainer.model import build_model, build_optimizers  # noqa: E402

EVENTS, SAMPLES, WINDOW_MS = 33_000, 19_000, 10_000
POSITIVES_AT = os.environ.get("POSITIVES_AT", DEMO_SETS["join.positives_at"])  # the demo's, or "window_close"
# the demo test's model (tests/integration/test_monitoring_pipeline.py SMALL over DEMO_SETS)
MODEL = {k: v for k, v in DEMO_SETS.items() if k.startswith("model.")} | {
    "model.item_vocab_size": 4096, "model.user_vocab_size": 4096, "model.category_vocab_size": 256,
    "model.aux_negatives": 32, "model.batch_size": 64}


def joined_samples(state: str) -> tuple[list[Sample], ReferenceAUCs]:
    cfg = SimConfig(users=2000, items=5000, seed=1, sessions_per_s=300 / EVENTS_PER_SESSION,
                    start_ms=1_700_000_000_000)
    events = sorted(simulate(cfg, EVENTS), key=lambda e: e.ts)
    ref = ReferenceAUCs(WINDOW_MS)
    for ev in events:
        ref.add(ev)
    s = load_settings(overrides={"state_dir": state, "topics.prefix": "b.", "join.attribution_window_ms": WINDOW_MS,
                                 "join.positives_at": POSITIVES_AT})
    proc = PartitionProcessor(0, open_partition_store(s, 0), s)
    out: list[bytes] = []
    for i in range(0, len(events), 2000):
        res = proc.process([Record(f"b.{'impressions' if isinstance(e, Impression) else 'clicks'}", 0, i + j,
                                   str(e.user_id).encode(), encode(e)) for j, e in enumerate(events[i:i + 2000])])
        proc.commit(res)
        out += [v for t, _, v in res.messages if t == "b.samples"]
    proc.store.close()
    codec = Codec(Sample)
    return [codec.decode(v) for v in out][:SAMPLES], ref


def progressive_auc(samples: list[Sample], overrides: dict, seed: int) -> float:
    s = load_settings(overrides=MODEL | overrides)
    torch.manual_seed(seed)
    model = build_model(s, "dmr")
    data = samples_to_batch(samples, s)
    # emission order: a batch is learned once emitted (the index stands in for time)
    preds = prequential(model, build_optimizers(model, s), data, np.arange(len(samples)), s.model.batch_size, "cpu")
    return auc(data.label, preds)


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as state:
        samples, ref = joined_samples(state)
    until = max(x.ts for x in samples)
    popularity = ref.result(until_ts=until).popularity_auc
    configs = {"bias step 0.02 (default)": {}, "bias at the dense step": {"model.bias_learning_rate": MODEL["model.learning_rate"]}}
    runs = {name: [progressive_auc(samples, o, seed) for seed in (0, 1)] for name, o in configs.items()}
    table = Table(title=f"demo stream: {len(samples):,} samples in emission order (positives at {POSITIVES_AT}), "
                        "progressive AUC (2 seeds)")
    table.add_column("model")
    table.add_column("AUC", justify="right")
    for name, v in runs.items():
        table.add_row(name, f"{np.mean(v):.4f} ({v[0]:.4f}, {v[1]:.4f})")
    table.add_row("item popularity, same impressions", f"{popularity:.4f}")
    Console().print(table)
    print(json.dumps({"samples": len(samples), "positives_at": POSITIVES_AT, "auc_bias_step_default": round(float(np.mean(runs["bias step 0.02 (default)"])), 4),
                      "auc_bias_at_dense_step": round(float(np.mean(runs["bias at the dense step"])), 4),
                      "popularity_auc_same_impressions": round(popularity, 4),
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
