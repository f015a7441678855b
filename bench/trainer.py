"""Trainer benchmark (not a test): end-to-end samples/s from the Kafka ``samples`` topic to the
optimizer step (consume, decode and batch assembly in the prefetch process, hand-over, dedupe,
prequential scoring, learning) next to the pure train-step rate at the same shape in the same
run, and the size and time of full vs delta publishes.

    .venv/bin/python bench/trainer.py

Shape: batch 1024, T=50, embedding 32, 2^20-row item tables (as bench/train_step.py).
2 shared cores: figures are noisy, the ratio is the figure to read. The host's speed drifts by tens
of percent within minutes, so the two rates are measured in alternating phases (pure steps, then
a fresh prefetch process from the last learned offsets for end-to-end batches, PHASES times) and
compared over the same spells; the per-phase ratios are printed too.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from dmrstream.allocator import tune_allocator  # noqa: E402
from dmrstream.broker import LocalBroker  # noqa: E402
from dmrstream.contracts import Sample, encode  # noqa: E402
from dmrstream.kafkaio import create_topics, make_producer  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from train_step import BATCH, DIM, T, make_columns, measure  # noqa: E402
from trainer.features import columns_to_batch  # noqa: E402
from trainer.prefetch import PREFETCH_QUEUE, Prefetch  # noqa: E402
from trainer.ready_batch import ReadyBatch, decode_ready, encode_ready  # noqa: E402
from trainer.service import Trainer  # noqa: E402

PHASES = int(os.environ.get("BENCH_PHASES", "4"))
PHASE_BATCHES = 10  # end-to-end batches timed per phase
PHASE_PURE_S = 2.0  # pure steps per phase (about as long as the end-to-end part)
BATCHES = PHASES * PHASE_BATCHES + PREFETCH_QUEUE + 4  # produced: each phase learns its own, the last reads ahead


def to_samples(cols: dict, offset: int) -> list[Sample]:
    out = []
    for i in range(len(cols["item_id"])):
        c = cols["counters"][i]
        out.append(Sample(
            sample_id=f"s{offset + i}", event_id=f"s{offset + i}", user_id=cols["user_id"][i],
            item_id=cols["item_id"][i], category_id=cols["category_id"][i], ts=cols["ts"][i] + offset + i,
            label=cols["label"][i], hist_item_ids=cols["hist_item_ids"][i], hist_category_ids=cols["hist_category_ids"][i],
            hist_behaviors=cols["hist_behaviors"][i], hist_ts=cols["hist_ts"][i],
            user_profile=cols["user_profile"][i], context=cols["context"][i],
            counters={"user_impressions": float(c[0]), "user_clicks": float(c[1]), "item_impressions": float(c[2]),
                      "item_clicks": float(c[3])}))
    return out


def per_batch_costs(settings, cols: dict) -> dict[str, float]:
    """Milliseconds per batch (best of 5) of what end to end adds around the step: decoding and
    checking the samples and assembling the model input (the prefetch process), and receiving the
    assembled batch's bytes (the trainer's process); column-wise (what the trainer does with valid
    batches) and message by message (its path for a batch holding a bad message, and the one
    before trainer/sample_decode.py)."""
    from dmrstream.contracts import Codec
    from trainer.features import columns_to_batch, samples_to_batch
    from trainer.sample_decode import SampleColumnsDecoder

    raw = [encode(x) for x in to_samples(cols, 0)]
    codec, columns = Codec(Sample, settings.limits), SampleColumnsDecoder(settings.limits)
    decoded, by_column = [codec.decode(r) for r in raw], columns.decode(raw)
    wire = encode_ready(ReadyBatch.of_columns(by_column, {0: len(raw)}, settings))

    def best(f):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times) * 1000
    return {"decode": best(lambda: columns.decode(raw)),
            "assemble": best(lambda: columns_to_batch(by_column.columns, settings)),
            "receive": best(lambda: decode_ready(wire)),
            "decode_per_message": best(lambda: [codec.decode(r) for r in raw]),
            "assemble_per_message": best(lambda: samples_to_batch(decoded, settings))}


def end_to_end(trainer, s, n_batches: int) -> tuple[int, float]:
    """Samples learned and seconds for ``n_batches`` batches from Kafka through a new prefetch
    process started at the trainer's offsets, as `dmrstream trainer` runs. Timed in the steady
    state of a backlog: the process has filled its queue first and decodes one batch per step while
    timed (it runs ahead by the queue's size; timing from an empty queue would charge a phase with
    up to 8 extra decodes). What it read beyond the learned batches is read again by the next phase,
    from the offsets learned."""
    pre = Prefetch(s, dict(trainer.offsets), BATCH, s.trainer.max_wait_ms / 1000, trainer.samples_topic_id).start()
    try:
        deadline = time.monotonic() + 120
        while not pre.full():
            if time.monotonic() > deadline or not pre.process.is_alive():
                raise RuntimeError(f"the prefetch process did not fill its queue (exit code {pre.process.exitcode})")
            time.sleep(0.01)
        t0, n0, learned = time.perf_counter(), trainer.samples_seen, 0
        while learned < n_batches:
            batch = pre.get(timeout=30)
            if batch is not None:
                trainer.learn(batch)
                learned += 1
        return trainer.samples_seen - n0, time.perf_counter() - t0
    finally:
        pre.close()


def main() -> None:
    tune_allocator()  # as every dmrstream process does (dmrstream/allocator.py)
    console = Console()
    rng = np.random.default_rng(0)
    cols = [make_columns(rng, BATCH) for _ in range(4)]
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        s = load_settings(overrides={
            "kafka.bootstrap_servers": broker.bootstrap, "topics.prefix": "bt.", "topics.partitions": 4,
            "model.batch_size": BATCH, "features.seq_len": T, "model.embedding_dim": DIM,
            "trainer.max_wait_ms": 500, "state_dir": f"{tmp}/state", "model_store": f"{tmp}/models",
            "trainer.delta_every_s": 1e9, "trainer.full_every_s": 1e9})
        create_topics(s)
        p = make_producer(s)
        total = 0
        for k in range(BATCHES):
            for smp in to_samples(cols[k % 4], k * BATCH):
                p.send(s.topics.name("samples"), key=str(smp.user_id).encode(), value=encode(smp))
                total += 1
        p.flush()
        p.close()

        torch.manual_seed(0)
        trainer = Trainer(s, "dmr", "cpu")
        costs = per_batch_costs(s, cols[0])
        built = [columns_to_batch(c, s) for c in cols]
        phases = []  # (pure step samples/s, end-to-end samples, end-to-end s)
        for _ in range(PHASES):
            # Pure step rate at the same shape, same process, same model (pre-built batches).
            pure_rate = measure(trainer.model, trainer.opts, built, trainer.device, PHASE_PURE_S)
            phases.append((pure_rate, *end_to_end(trainer, s, PHASE_BATCHES)))
        pure = len(phases) / sum(1 / p[0] for p in phases)  # same weight per phase as e2e's time
        e2e = sum(p[1] for p in phases) / sum(p[2] for p in phases)
        ratios = [p[1] / p[2] / p[0] for p in phases]

        t = time.perf_counter()
        full = trainer.publish("full")
        full_s = time.perf_counter() - t
        b = columns_to_batch(cols[0], s)
        from trainer.model import train_step
        train_step(trainer.model, trainer.opts, b.to_torch(trainer.device))
        trainer._note_touched()
        t = time.perf_counter()
        delta = trainer.publish("delta")
        delta_s = time.perf_counter() - t
        sizes = {m.version: m.size_bytes for m in trainer.store.versions()}
        trainer.close()

    table = Table(title=f"trainer: batch {BATCH}, T={T}, embedding {DIM}, 2^20-row item tables, {total:,} samples, cpu")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("pure train step samples/s (same model, pre-built batches)", f"{pure:,.0f}"),
            ("end to end Kafka -> optimizer samples/s", f"{e2e:,.0f}"),
            ("end to end / pure step", f"{e2e / pure:.2f}  (target >= 0.80)"),
            (f"  per phase ({PHASES} alternating phases)", " ".join(f"{r:.2f}" for r in ratios)),
            ("per 1024: pure step / decode + check / assembly / receive",
             f"{BATCH / pure * 1e3:,.0f} / {costs['decode']:,.1f} / {costs['assemble']:,.1f}"
             f" / {costs['receive']:,.1f} ms"),
            ("  decode + check / assembly message by message (bad batches)",
             f"{costs['decode_per_message']:,.1f} / {costs['assemble_per_message']:,.1f} ms"),
            ("full publish: size, time", f"{sizes[full.version] / 1e6:,.1f} MB, {full_s * 1e3:,.0f} ms"),
            ("delta publish (one batch of rows): size, time", f"{sizes[delta.version] / 1e6:,.2f} MB, {delta_s * 1e3:,.0f} ms"),
            ("delta / full size", f"{sizes[delta.version] / sizes[full.version]:.4f}")]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print("shared 2-core machine: noisy; no CUDA here, the GPU path is not measured")
    print(json.dumps({"pure_step_samples_per_s": round(pure), "e2e_samples_per_s": round(e2e),
                      "e2e_vs_pure_ratio": round(e2e / pure, 3), "e2e_vs_pure_ratio_phase_min": round(min(ratios), 3),
                      "e2e_vs_pure_ratio_phase_max": round(max(ratios), 3), "step_per_batch_ms": round(BATCH / pure * 1e3, 1),
                      **{f"{k}_per_batch_ms": round(v, 1) for k, v in costs.items()},
                      "full_publish_bytes": sizes[full.version],
                      "full_publish_ms": round(full_s * 1e3), "delta_publish_bytes": sizes[delta.version],
                      "delta_publish_ms": round(delta_s * 1e3)}))


if __name__ == "__main__":
    main()
