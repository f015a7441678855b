"""`dmrstream dashboard` (the built-in live page) and `dmrstream demo` (everything in one go)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dmrstream.cli import settings_of


def _parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} expects NAME=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def dashboard(
    ctx: typer.Context,
    port: Optional[int] = typer.Option(None, help="Port of the page (default: metrics.dashboard_port)."),
    bind: Optional[str] = typer.Option(None, help="Listen address (default: metrics.bind, loopback)."),
    target: list[str] = typer.Option([], "--target", help="NAME=URL of a component's /metrics (repeatable; "
                                     "default: streamer, trainer and scorer on the settings' ports)."),
    streamer_workers: int = typer.Option(1, min=1, help="Streamer workers to scrape (ports streamer_port + i)."),
    interval: float = typer.Option(2.0, min=0.2, help="Seconds between scrapes."),
    reference: list[str] = typer.Option([], "--reference", help="LABEL=AUC drawn as a dashed line on the AUC "
                                        "chart (e.g. 'popularity=0.59'; repeatable)."),
    lag: bool = typer.Option(True, help="Read consumer lag from Kafka (consumer groups of the topic prefix)."),
) -> None:
    """Serve the live page: AUC over time, throughput, lag, model versions, freshness (no CDN)."""
    from monitoring.dashboard import default_targets, run_dashboard

    settings = settings_of(ctx)
    host = bind or settings.metrics.bind
    port = settings.metrics.dashboard_port if port is None else port
    targets = _parse_pairs(target, "--target") or default_targets(settings, streamer_workers=streamer_workers)
    try:
        refs = {k: float(v) for k, v in _parse_pairs(reference, "--reference").items()}
    except ValueError as e:
        raise typer.BadParameter(f"--reference: {e}") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    # The address on its own line on stdout, so scripts (and the demo) can read it.
    print(f"http://{shown}:{port}/", flush=True)
    print(f"live page on http://{shown}:{port}/ scraping {', '.join(targets) or 'nothing'}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    run_dashboard(settings, targets, host, port, interval, refs, lag)


def demo(
    ctx: typer.Context,
    duration: float = typer.Option(180.0, min=5, help="Seconds to run before the summary (Ctrl-C ends earlier)."),
    events_per_s: float = typer.Option(300.0, min=1, help="Simulated events per second (event time follows "
                                       "wall time)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Replay this MovieLens directory instead of "
                                        "simulating."),
    seed: int = typer.Option(1, help="Simulator seed."),
    model: str = typer.Option("dmr", "--model", help="dmr | din | lr"),
    device: Optional[str] = typer.Option(None, "--device", help="Trainer device: cpu | cuda (default: auto)."),
    workdir: Optional[Path] = typer.Option(None, help="State, models and logs (default: a fresh temporary "
                                           "directory, removed at the end)."),
    dashboard_port: Optional[int] = typer.Option(None, help="Page port (default: metrics.dashboard_port, or "
                                                 "a free one when that is busy)."),
    live: Optional[bool] = typer.Option(None, help="Live terminal view (default: when stdout is a terminal)."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the summary here as JSON."),
    simulate_users: int = typer.Option(2_000, min=1, help="Simulated users."),
    simulate_items: int = typer.Option(5_000, min=1, help="Simulated items."),
) -> None:
    """Everything in one go: local broker (unless --bootstrap), streamer, trainer, scorer, live page,
    simulated stream (or --data MovieLens); live terminal view, summary table, clean shutdown."""
    from monitoring.demo import DemoOptions, run_demo

    opts = DemoOptions(duration_s=duration, events_per_s=events_per_s, data=data, seed=seed, model=model,
                       device=device, workdir=workdir, dashboard_port=dashboard_port, live=live,
                       summary_json=summary_json, users=simulate_users, items=simulate_items)
    rc = run_demo(ctx, settings_of(ctx), opts)
    raise typer.Exit(rc)
