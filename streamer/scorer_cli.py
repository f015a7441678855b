"""``dmrstream scorer``: a scorer as its own role (scale out by running more of them)."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import typer


def scorer(
    ctx: typer.Context,
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after this long (default: run)."),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus port (default from settings; 0 disables)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: settings scorer.threads)."),
) -> None:
    """Answer score-requests on scores with the freshest good model; hot-swap versions from
    model-updates; score impressions for the serving AUC per model version."""
    # Handlers first: a SIGTERM while torch is still importing must still end in a clean stop.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from dmrstream.cli import console, settings_of
    from monitoring.metrics import serve_metrics
    from streamer.scoring_service import run

    settings = settings_of(ctx)
    if threads:
        settings = settings.model_copy(update={"scorer": settings.scorer.model_copy(update={"threads": threads})})
    serve_metrics(settings.metrics.scorer_port if metrics_port is None else metrics_port, settings.metrics.bind)
    service = run(settings, stop, max_seconds)
    live = service.holder.get()
    console.print(f"scorer stopped: {service.answered:,} requests answered, serving "
                  f"{'v%d' % live.version if live else 'no version'}")
