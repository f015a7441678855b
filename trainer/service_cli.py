"""`dmrstream trainer` (the training service) and `dmrstream models list|show|rollback`."""

from __future__ import annotations

import json
import signal
import threading
from typing import Optional

import typer
from rich.table import Table

from dmrstream.cli import console, settings_of

models_app = typer.Typer(help="List, inspect and roll back published model versions.", no_args_is_help=True)


def trainer(
    ctx: typer.Context,
    model: str = typer.Option("dmr", "--model", help="dmr | din | lr"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: settings, auto)"),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after this long (default: run)."),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus port (default from settings; 0 disables)."),
) -> None:
    """Learn DMR incrementally from the samples topic; checkpoint, publish full and delta versions."""
    # Handlers first: a SIGTERM while torch is still importing must still end in a clean stop.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from monitoring.metrics import serve_metrics
    from trainer.service import run

    settings = settings_of(ctx)
    serve_metrics(settings.metrics.trainer_port if metrics_port is None else metrics_port, settings.metrics.bind)
    t = run(settings, model, device, max_seconds, stop)
    console.print(f"trainer stopped: {t.samples_seen:,} samples learned, last version v{t.version}")


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Published versions, oldest first."""
    from trainer.modelstore import ModelStore

    versions = ModelStore(settings_of(ctx).model_store).versions()
    if as_json:
        print(json.dumps([v.__dict__ for v in versions]))
        return
    table = Table("version", "kind", "base", "size", "samples", "trained until (ms)", "auc_window")
    for v in versions:
        table.add_row(str(v.version), v.kind, str(v.base_version or ""), f"{v.size_bytes / 1e6:.1f} MB",
                      f"{v.samples_seen:,}", str(v.trained_until_ts), f"{v.metrics.get('auc_window', float('nan')):.4f}")
    console.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, version: int) -> None:
    """Metadata of one version and the chain that loads it."""
    from trainer.modelstore import ModelStore, ModelStoreError

    store = ModelStore(settings_of(ctx).model_store)
    try:
        meta = store.meta(version)
        chain = [m.version for m in store.chain(version)]
    except ModelStoreError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1)
    print(json.dumps(meta.__dict__ | {"chain": chain, "uri": store.uri_of(meta)}, indent=2))


@models_app.command("rollback")
def models_rollback(ctx: typer.Context, version: int) -> None:
    """Serve ``version`` again: its weights are republished as a new full version (versions only
    move forward, so every scorer follows) and announced on model-updates."""
    from dmrstream.contracts import ModelUpdate, encode
    from dmrstream.kafkaio import make_producer
    from trainer.modelstore import ModelStore, ModelStoreError

    settings = settings_of(ctx)
    store = ModelStore(settings.model_store)
    try:
        old = store.meta(version)
        state = store.load(version)
    except ModelStoreError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1)
    new = store.publish(store.latest_version() + 1, "full", state, base_version=None,
                        trained_until_ts=old.trained_until_ts, samples_seen=old.samples_seen,
                        metrics=old.metrics | {"rollback_of": float(version)})
    update = ModelUpdate(version=new.version, kind="full", base_version=None, uri=store.uri_of(new), sha256=new.sha256,
                         created_at=new.created_at, trained_until_ts=new.trained_until_ts,
                         samples_seen=new.samples_seen, metrics=new.metrics)
    producer = make_producer(settings)
    producer.send(settings.topics.name("model_updates"), key=b"model", value=encode(update)).get(timeout=30)
    producer.close()
    console.print(f"v{version} republished as v{new.version} and announced")
