"""MovieLens 100K through the whole pipeline vs `dmrstream evaluate --mode prequential`.

replay (CLI) -> impressions/clicks -> streamer (CLI, one worker) -> samples -> trainer (CLI);
the trainer's prequential predictions (each sample scored before it is learned, with its event
time) give the AUC over the chronological test part (the last 10 % by time), compared with the
offline prequential evaluation of the same samples by the same model code in the same run.

    .venv/bin/python bench/pipeline_movielens.py [--until-days D]   # D: only the first D days

One partition, so item counters are global as in the offline importer. After the replay, one
sentinel impression and click far in the future close the last attribution windows (a live
stream would simply go on). Needs ../shared/data/ml-100k.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmrstream.broker import LocalBroker  # noqa: E402
from dmrstream.contracts import Click, Impression, encode  # noqa: E402
from dmrstream.kafkaio import create_topics, make_producer  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.evaluate import auc, chronological_split, evaluate  # noqa: E402
from trainer.importers import movielens_samples  # noqa: E402
from trainer.service import learned_ids  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ml-100k"
# A model small enough for 2 cores; the comparison is about the streaming path, not the size.
MODEL = {"model.item_vocab_size": 1 << 16, "model.user_vocab_size": 1 << 14, "model.category_vocab_size": 1024,
         "model.aux_negatives": 200, "model.batch_size": 256}


def run_pipeline(until_ms: int | None, n_expected: int, work: Path, console: Console) -> tuple[np.ndarray, ...]:
    with LocalBroker() as broker:
        overrides = {"kafka.bootstrap_servers": broker.bootstrap, "kafka.session_timeout_ms": 6000,
                     "topics.prefix": "ml.", "topics.partitions": 1, "state_dir": str(work / "state"),
                     "model_store": str(work / "models"), "metrics.streamer_port": 0, "metrics.trainer_port": 0,
                     "trainer.delta_every_s": 30.0, "trainer.full_every_s": 3600.0,
                     "trainer.checkpoint_every_s": 5.0, **MODEL}
        s = load_settings(overrides=overrides)
        create_topics(s)
        base = [sys.executable, "-m", "dmrstream", "--bootstrap", broker.bootstrap, "--log-level", "WARNING"]
        for k, v in overrides.items():
            if k != "kafka.bootstrap_servers":
                base += ["--set", f"{k}={v}"]
        t0 = time.perf_counter()
        cmd = [*base, "replay", str(DATA), "--no-progress"] + (["--until", str(until_ms)] if until_ms else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        replay_s = time.perf_counter() - t0
        # Close every open window: one far-future event on both inputs of the partition.
        far = (until_ms or 2_000_000_000_000) + 86_400_000
        p = make_producer(s)
        p.send(s.topics.name("impressions"), key=b"sentinel", value=encode(Impression(
            event_id="sentinel:i", user_id="sentinel", item_id="sentinel", category_id="sentinel", ts=far)))
        p.send(s.topics.name("clicks"), key=b"sentinel", value=encode(Click(
            event_id="sentinel:c", user_id="sentinel", item_id="none", category_id="none", ts=far + 1)))
        p.flush()
        p.close()
        streamer = subprocess.Popen([*base, "streamer", "--metrics-port", "0"], stdout=subprocess.DEVNULL)
        trainer = subprocess.Popen([*base, "trainer", "--metrics-port", "0"], stdout=subprocess.DEVNULL)
        t1 = time.perf_counter()
        try:
            while len(learned_ids(s.state_dir)) < n_expected:
                time.sleep(2)
                if trainer.poll() is not None or streamer.poll() is not None:
                    raise RuntimeError("a pipeline process died")
                if time.perf_counter() - t1 > 1800:
                    raise TimeoutError(f"learned {len(learned_ids(s.state_dir))} of {n_expected}")
        finally:
            for proc in (trainer, streamer):
                proc.send_signal(signal.SIGTERM)
            for proc in (trainer, streamer):
                proc.wait(120)
        console.print(f"pipeline: replay {replay_s:.0f} s, streamer+trainer {time.perf_counter() - t1:.0f} s")
        _, _, _, arrays = load_checkpoint(Path(s.state_dir) / "trainer" / "checkpoints")
        return arrays["scores"], arrays["labels"], arrays["ts"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--until-days", type=float, default=None, help="only the first D days of the data")
    args = ap.parse_args()
    console = Console()
    if not DATA.is_dir():
        console.print(f"{DATA} is absent: nothing to measure")
        print(json.dumps({"skipped": True}))
        return
    settings = load_settings(overrides=MODEL)
    samples = movielens_samples(DATA, settings.features.seq_len)
    until_ms = None
    if args.until_days:
        until_ms = min(s.ts for s in samples) + int(args.until_days * 86_400_000)
        samples = [s for s in samples if s.ts < until_ms]
    with tempfile.TemporaryDirectory() as tmp:
        scores, labels, ts = run_pipeline(until_ms, len(samples), Path(tmp), console)
    order = np.argsort(ts, kind="stable")
    _, test = chronological_split(ts[order])
    pipeline_auc = auc(labels[order][test], scores[order][test])
    t = time.perf_counter()
    offline = evaluate(samples, settings, "dmr", mode="prequential", seeds=(0,), log=lambda m: None)
    eval_s = time.perf_counter() - t
    diff = pipeline_auc - offline["test_auc_mean"]
    table = Table(title=f"MovieLens 100K: {len(samples):,} samples, test part {len(test):,}")
    table.add_column("path")
    table.add_column("prequential test AUC", justify="right")
    table.add_row("replay -> streamer -> trainer (Kafka)", f"{pipeline_auc:.4f}")
    table.add_row(f"dmrstream evaluate --mode prequential ({eval_s:.0f} s)", f"{offline['test_auc_mean']:.4f}")
    table.add_row("difference (target |d| <= 0.005)", f"{diff:+.4f}")
    console.print(table)
    print(json.dumps({"samples": len(samples), "learned": int(len(scores)), "pipeline_test_auc": round(pipeline_auc, 4),
                      "evaluate_test_auc": round(offline["test_auc_mean"], 4), "auc_difference": round(diff, 4)}))


if __name__ == "__main__":
    main()
