"""`dmrstream streamer`: run the faust streamer (one worker, or N worker processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import typer

from dmrstream.cli import settings_of


def streamer(
    ctx: typer.Context,
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes sharing the partitions."),
    metrics_port: int = typer.Option(None, help="Prometheus port (default from settings; 0 disables)."),
) -> None:
    """Join impressions with clicks in event time, keep the feature store, emit samples."""
    settings = settings_of(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(
            update={"streamer_port": metrics_port})})
    if workers == 1:
        from streamer.app import run_worker

        run_worker(settings)
        return
    # N processes of this same command: each is a member of the consumer group; faust assigns
    # co-partitioned impressions/clicks partitions together and state follows partitions.
    base = [sys.executable, "-m", "dmrstream", *_global_args(ctx)]
    procs = []
    for i in range(workers):
        port = settings.metrics.streamer_port + i if settings.metrics.streamer_port else 0
        procs.append(subprocess.Popen([*base, "streamer", "--workers", "1", "--metrics-port", str(port)]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5) and all(p.poll() is None for p in procs):
        pass
    for p in procs:
        if p.poll() is None:
            p.terminate()
    rc = max((p.wait(30) or 0) for p in procs)
    raise typer.Exit(rc)


def _global_args(ctx: typer.Context) -> list[str]:
    """The global options this command was started with, for its child processes."""
    parent = ctx.parent
    args: list[str] = []
    if parent is None:
        return args
    p = parent.params
    if p.get("config"):
        args += ["--config", str(p["config"])]
    if p.get("bootstrap"):
        args += ["--bootstrap", p["bootstrap"]]
    for s in p.get("set_") or []:
        args += ["--set", s]
    if p.get("log_level"):
        args += ["--log-level", p["log_level"]]
    return args
