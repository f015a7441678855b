"""``dmrstream replay`` and ``dmrstream simulate``: logs or synthetic streams into Kafka (or a file).

Heavy imports stay inside the commands so ``dmrstream --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

err = Console(stderr=True)
out = Console()


def _progress_bar(enabled: bool):
    """A rich progress display (events, events/s, event-time clock) and its update callback."""
    from datetime import datetime, timezone

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not enabled:
        return None, None
    bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TextColumn("{task.completed:,} events"),
                   TextColumn("{task.fields[rate]:,.0f} ev/s"), TextColumn("event time {task.fields[clock]}"),
                   TimeElapsedColumn(), console=err, refresh_per_second=4, transient=False)
    task = bar.add_task("sending", total=None, rate=0.0, clock="-")

    def update(s) -> None:
        clock = "-" if s.last_ts is None else datetime.fromtimestamp(s.last_ts / 1000, timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S")
        bar.update(task, completed=s.events, rate=s.events_per_s, clock=clock)

    return bar, update


def _sink(settings, out_file: Optional[Path], connect_timeout_s: float = 15.0, client: str = "aiokafka"):
    from replay.sinks import JsonlSink, kafka_sink

    if out_file is not None:
        return JsonlSink(out_file), str(out_file)
    from dmrstream.kafkaio import create_topics, wait_for_broker

    wait_for_broker(settings, timeout_s=connect_timeout_s)
    create_topics(settings)
    t = settings.topics
    return kafka_sink(settings, client), f"Kafka {settings.kafka.bootstrap_servers} ({t.name('impressions')}, {t.name('clicks')})"


def _check_client(client: str) -> None:
    if client not in ("aiokafka", "kafka-python"):
        raise typer.BadParameter(f"--client must be aiokafka or kafka-python, not {client!r}")


def _pacer(speed: str, rate: Optional[float]):
    from replay.pacing import Pacer, parse_speed

    try:
        return Pacer(speed=parse_speed(speed), rate=rate)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def print_summary(s, target: str, sources=None, extra: dict | None = None) -> None:
    """The end-of-run table: counts, bad rows (first ones with line numbers), throughput."""
    from datetime import datetime, timezone

    from rich.table import Table

    def when(ts):
        return "-" if ts is None else datetime.fromtimestamp(ts / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    table = Table(title=f"sent to {target}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [("events sent", f"{s.events:,}"), ("impressions", f"{s.impressions:,}"),
            ("  of which sampled negatives", f"{s.sampled:,}"), ("clicks/behaviours", f"{s.clicks:,}"),
            ("bad rows", f"{s.bad.count:,}"), ("event time", f"{when(s.first_ts)} .. {when(s.last_ts)}"),
            ("elapsed", f"{s.elapsed_s:.2f} s"), ("events/s", f"{s.events_per_s:,.0f}"),
            ("MB/s (JSON payload)", f"{s.mb_per_s:.2f}"), ("delivery failures", f"{s.delivery_failures:,}")]
    for k, v in (extra or {}).items():
        rows.append((k, v))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    for info in sources or ():
        out.print(f"source {info.tag}: {info.kind}, {info.order or 'not read'}")
    if s.bad.first:
        out.print(f"[yellow]first bad rows ({len(s.bad.first)} of {s.bad.count}):[/]")
        for tag, line, reason in s.bad.first:
            out.print(f"  {tag}:{line}: {reason}", markup=False, highlight=False)


def replay(
    ctx: typer.Context,
    sources: list[Path] = typer.Argument(..., help="Files or directories (MovieLens dir, Alimama dir, CSV, JSONL, Parquet)."),
    fmt: str = typer.Option("auto", "--format", help="auto, movielens, taobao, alimama, csv, jsonl, parquet, events."),
    map_: list[str] = typer.Option([], "--map", help="Generic formats: key=column (user, item, category, ts, ts_unit, "
                                   "label, label_min, behavior, request_id, position, item_features=a,b ...)."),
    mapping: Optional[Path] = typer.Option(None, "--mapping", help="JSON/TOML file with the same keys as --map."),
    click_threshold: float = typer.Option(4.0, help="MovieLens: a rating >= this is also a click."),
    negatives: int = typer.Option(0, "--negatives", min=0, help="Taobao UserBehavior: sampled impressions per pv."),
    seed: int = typer.Option(0, help="Seed of the negative sampler."),
    speed: str = typer.Option("max", help="Event time per wall time (60 = an hour a minute) or 'max'."),
    rate: Optional[float] = typer.Option(None, help="Cap in events per second."),
    limit: Optional[int] = typer.Option(None, min=0, help="Stop after this many events."),
    from_: Optional[str] = typer.Option(None, "--from", help="Skip events before this time (ISO or epoch)."),
    until: Optional[str] = typer.Option(None, help="Stop at this event time (exclusive)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write JSON lines here instead of Kafka."),
    strict: bool = typer.Option(False, help="Abort at the first bad row."),
    presorted: bool = typer.Option(False, help="Trust each file is in time order: stream it in constant memory "
                                   "(out-of-order rows become bad rows) instead of sorting it in memory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    connect_timeout: float = typer.Option(15.0, help="Seconds to wait for the broker."),
    client: str = typer.Option("aiokafka", help="Kafka producer: aiokafka (C batch builder, fast) or kafka-python."),
) -> None:
    """Replay logs into the impressions/clicks topics in event-time order, keyed by user."""
    from dmrstream.cli import settings_of
    from replay.generic import ColumnMap
    from replay.records import BadRows, ReplayError, parse_time_arg
    from replay.runner import flatten, run
    from replay.sources import FORMATS, ReplayOptions, open_sources

    settings = settings_of(ctx)
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    try:
        opts = ReplayOptions(fmt=fmt, mapping=ColumnMap.build(mapping, map_), click_threshold=click_threshold,
                             negatives=negatives, seed=seed, presorted=presorted,
                             from_ms=parse_time_arg(from_), until_ms=parse_time_arg(until))
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    bad = BadRows(strict=strict)
    try:
        records, infos = open_sources(sources, opts, bad, settings.limits)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    pacer = _pacer(speed, rate)
    _check_client(client)
    try:
        sink, target = _sink(settings, out_file, connect_timeout, client)
    except Exception as e:
        err.print(f"[red]cannot reach Kafka at {settings.kafka.bootstrap_servers}:[/] {e}")
        raise typer.Exit(1)
    bar, update = _progress_bar(progress)
    try:
        if bar:
            bar.start()
        summary = run(flatten(records), sink, pacer=pacer, limit=limit, bad=bad, progress=update)
    except ReplayError as e:
        if bar:
            bar.stop()
        err.print(f"[red]bad row (--strict):[/] {e}")
        raise typer.Exit(2)
    except (ValueError, OSError) as e:  # unreadable source (bad header, I/O error)
        if bar:
            bar.stop()
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    finally:
        if bar:
            bar.stop()
    print_summary(summary, target, infos)
    if summary.delivery_failures:
        raise typer.Exit(1)


def simulate(
    ctx: typer.Context,
    events: Optional[int] = typer.Option(None, "--events", min=0, help="Events to produce (default: endless to "
                                         "Kafka, 1,000,000 to a file)."),
    seed: int = typer.Option(0, help="Same seed, same stream."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write JSON lines here."),
    kafka: bool = typer.Option(False, "--kafka", help="Produce to Kafka (the default when --out is not given)."),
    rate: Optional[float] = typer.Option(None, help="Events per second (steady stream)."),
    speed: str = typer.Option("max", help="Event time per wall time, or 'max'."),
    users: int = typer.Option(10_000, min=1),
    items: int = typer.Option(20_000, min=1),
    categories: int = typer.Option(100, min=1),
    sessions_per_s: float = typer.Option(5.0, help="Session starts per second of event time."),
    start: Optional[str] = typer.Option(None, help="Event time of the first session (ISO or epoch; default 2024-01-01)."),
    evaluate: bool = typer.Option(False, "--eval", help="Also print the oracle and item-popularity AUCs "
                                  "(memory grows with the number of impressions)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    connect_timeout: float = typer.Option(15.0, help="Seconds to wait for the broker."),
    client: str = typer.Option("aiokafka", help="Kafka producer: aiokafka (C batch builder, fast) or kafka-python."),
) -> None:
    """Generate a realistic stream (true click probability in each impression) into Kafka or a file."""
    from dmrstream.cli import settings_of
    from replay.evaluate import ReferenceAUCs
    from replay.records import parse_time_arg
    from replay.runner import run
    from replay.simulate import DEFAULT_START_MS, SimConfig
    from replay.simulate import simulate as generate

    settings = settings_of(ctx)
    if out_file is not None and kafka:
        raise typer.BadParameter("--out and --kafka: pick one")
    if events is None and out_file is not None:
        events = 1_000_000
    try:
        cfg = SimConfig(users=users, items=items, categories=categories, seed=seed, sessions_per_s=sessions_per_s,
                        start_ms=parse_time_arg(start) or DEFAULT_START_MS)
        stream = generate(cfg, events)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    ref = ReferenceAUCs(settings.join.attribution_window_ms) if evaluate else None
    if ref is not None:
        stream = _tap(stream, ref)
    pacer = _pacer(speed, rate)
    _check_client(client)
    try:
        sink, target = _sink(settings, out_file, connect_timeout, client)
    except Exception as e:
        err.print(f"[red]cannot reach Kafka at {settings.kafka.bootstrap_servers}:[/] {e}")
        raise typer.Exit(1)
    bar, update = _progress_bar(progress)
    if bar:
        bar.start()
    try:
        summary = run(stream, sink, pacer=pacer, progress=update)  # Ctrl-C ends it, flushed and summarised
    finally:
        if bar:
            bar.stop()
    extra = {}
    if ref is not None:
        r = ref.result()
        extra = {"oracle AUC (true_ctr)": f"{r.oracle_auc:.4f}", "item popularity AUC": f"{r.popularity_auc:.4f}"}
    print_summary(summary, target, extra=extra)
    if summary.delivery_failures:
        raise typer.Exit(1)


def _tap(stream, ref):
    for ev in stream:
        ref.add(ev)
        yield ev
