"""``dmrstream evaluate``: offline / prequential evaluation of DMR, its ablations and baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dmrstream.cli import console, settings_of


def evaluate(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="MovieLens 100K directory or Alimama 267-column file."),
    model: str = typer.Option("dmr", "--model", help="dmr | din | lr | counters"),
    ablate: list[str] = typer.Option([], "--ablate", help="Flip a DMR part (repeatable): u2i, i2i, aux_loss, "
                                     "position, shared_item_table, time_gaps, counters."),
    mode: str = typer.Option("prequential", "--mode", help="prequential | offline"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Number of seeds (0..N-1)."),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Offline: most epochs (early stopping)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N events in time order."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON result file (default: print only)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1 is robust on a busy machine)."),
) -> None:
    """Chronological split (last 10 % by time = test); prints test AUC and logloss mean +- std."""
    import torch

    from trainer.evaluate import evaluate as run, load_samples

    if model not in ("dmr", "din", "lr", "counters"):
        raise typer.BadParameter(f"unknown model {model!r}")
    if mode not in ("prequential", "offline"):
        raise typer.BadParameter(f"unknown mode {mode!r}")
    settings = settings_of(ctx)
    torch.set_num_threads(threads)
    samples = load_samples(str(data), settings.features.seq_len, limit)
    result = run(samples, settings, model, ablate, mode, list(range(seeds)), epochs,
                 log=lambda m: console.print(m, highlight=False))
    result["data"] = str(data)
    name = model + "".join(f" -{a}" for a in ablate)
    console.print(f"[bold]{name} {mode}[/]: test AUC {result['test_auc_mean']:.4f} +- {result['test_auc_std']:.4f}, "
                  f"logloss {result['test_logloss_mean']:.4f} +- {result['test_logloss_std']:.4f} "
                  f"({len(result['seeds'])} seeds)")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {out}")
