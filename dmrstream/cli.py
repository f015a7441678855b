"""``dmrstream``: one command line for every role.

Global options pick the settings (``--config``, ``--bootstrap``, ``--set key=value``); each
role adds its own command or command group here.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dmrstream import __version__
from dmrstream.allocator import tune_allocator
from dmrstream.settings import Settings, load_settings

app = typer.Typer(help="dmrstream: streaming online learning of the DMR CTR model.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Create and list the Kafka topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
console = Console()


def _parse_sets(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.callback()
def main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML settings file (or $DMRSTREAM_CONFIG)."),
    bootstrap: Optional[str] = typer.Option(None, "--bootstrap", "-b", help="Kafka bootstrap servers."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting: --set join.attribution_window_ms=60000"),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING..."),
) -> None:
    overrides = _parse_sets(set_) | {"kafka.bootstrap_servers": bootstrap, "log_level": log_level}
    try:
        settings = load_settings(config, overrides)
    except Exception as e:  # a bad file/flag is a usage error, not a traceback
        raise typer.BadParameter(str(e)) from None
    tune_allocator()  # large torch temporaries reuse heap memory instead of fresh pages each pass
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python narrates every connection at INFO; keep its warnings only unless debugging.
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.WARNING)
    ctx.obj = settings


def settings_of(ctx: typer.Context) -> Settings:
    """The settings built by the global options (for role commands)."""
    return ctx.obj


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"dmrstream {__version__}")


@app.command("settings")
def show_settings(ctx: typer.Context) -> None:
    """Print the effective settings as JSON (secrets masked)."""
    print(settings_of(ctx).model_dump_json(indent=2))


@app.command()
def broker(
    ctx: typer.Context,
    port: int = typer.Option(0, help="Port on 127.0.0.1 (0 = a free port)."),
    host: str = typer.Option("127.0.0.1", help="Listen address (loopback unless you mean otherwise)."),
    create: bool = typer.Option(True, help="Create the project's topics once the broker answers."),
) -> None:
    """Run the embedded local Kafka-protocol broker (tansu, memory storage) until Ctrl-C/SIGTERM."""
    from dmrstream.broker import LocalBroker
    from dmrstream.kafkaio import create_topics

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with LocalBroker(host=host, port=port or None) as b:
        if create:
            settings = settings_of(ctx)
            settings = settings.model_copy(
                update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": b.bootstrap})})
            # A fresh broker holds nothing yet: a topic with the wrong partition count was
            # auto-created by a client reconnecting first (a restart on the same port).
            create_topics(settings, replace_mismatched=True)
        # The address on its own line on stdout, so scripts can read it.
        print(b.bootstrap, flush=True)
        print(f"broker ready at {b.bootstrap} (memory storage); Ctrl-C stops", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if b.proc.poll() is not None:
                print(f"broker exited with code {b.proc.returncode}", file=sys.stderr)
                raise typer.Exit(1)
    print("broker stopped", file=sys.stderr)


@topics_app.command("create")
def topics_create(
    ctx: typer.Context,
    partitions: Optional[int] = typer.Option(None, help="Partitions of the user-keyed topics."),
) -> None:
    """Create every topic (co-partitioned user-keyed topics share one partition count)."""
    from dmrstream.kafkaio import create_topics

    settings = settings_of(ctx)
    if partitions:
        settings = settings.model_copy(update={"topics": settings.topics.model_copy(update={"partitions": partitions})})
    try:
        result = create_topics(settings)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    except Exception as e:
        console.print(f"[red]cannot reach Kafka at {settings.kafka.bootstrap_servers}:[/] {e}")
        raise typer.Exit(1)
    table = Table("topic", "status")
    for name, status in sorted(result.items()):
        table.add_row(name, status)
    console.print(table)


@topics_app.command("list")
def topics_list(ctx: typer.Context) -> None:
    """List the topics on the cluster with their partition counts."""
    from dmrstream.kafkaio import list_topics

    settings = settings_of(ctx)
    try:
        topics = list_topics(settings)
    except Exception as e:
        console.print(f"[red]cannot reach Kafka at {settings.kafka.bootstrap_servers}:[/] {e}")
        raise typer.Exit(1)
    table = Table("topic", "partitions")
    for name, n in sorted(topics.items()):
        table.add_row(name, str(n))
    console.print(table)


# Role commands: each package contributes a typer app or command from its own cli module.
# (Keep imports inside the command functions of those modules so `dmrstream --help` stays fast.)
from streamer.cli import streamer as _streamer_command  # noqa: E402  (the CLI may import streamer/)

app.command("streamer")(_streamer_command)
from featurestore.cli import app as _features_app  # noqa: E402

app.add_typer(_features_app, name="features")

from replay.cli import replay as _replay_command, simulate as _simulate_command  # noqa: E402

app.command("replay")(_replay_command)
app.command("simulate")(_simulate_command)
from trainer.cli import evaluate as _evaluate_command  # noqa: E402

app.command("evaluate")(_evaluate_command)
from trainer.service_cli import models_app as _models_app, trainer as _trainer_command  # noqa: E402

app.command("trainer")(_trainer_command)
app.add_typer(_models_app, name="models")
from streamer.scorer_cli import scorer as _scorer_command  # noqa: E402

app.command("scorer")(_scorer_command)
from monitoring.cli import dashboard as _dashboard_command, demo as _demo_command  # noqa: E402

app.command("dashboard")(_dashboard_command)
app.command("demo")(_demo_command)
