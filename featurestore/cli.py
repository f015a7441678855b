"""``dmrstream features ...``: inspect the feature store (read-only, safe beside a running worker)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Inspect the feature store (per-partition RocksDB).", no_args_is_help=True)
console = Console()


def _settings(ctx: typer.Context):
    from dmrstream.cli import settings_of

    return settings_of(ctx)


def _partitions(settings) -> list[int]:
    root = settings.state_dir / "featurestore"
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.name[:1] == "p" and p.name[1:].isdigit())


def _candidates(user_id: str) -> list:
    """The id as typed, and as an int when it looks like one (ids keep their source type)."""
    out: list = []
    if user_id.lstrip("-").isdigit():
        out.append(int(user_id))
    out.append(user_id)
    return out


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@app.command("show")
def show(
    ctx: typer.Context,
    user_id: str = typer.Argument(..., help="User id (tried as an int and as a string)."),
    partition: Optional[int] = typer.Option(None, "--partition", "-p", help="Only this partition."),
    all_: bool = typer.Option(False, "--all", help="Show the user in every partition that has it."),
    as_of: Optional[int] = typer.Option(None, help="Only behaviours strictly before this event time (ms)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """A user's behaviour sequence (oldest first), counters and profile."""
    from featurestore import open_partition_store

    settings = _settings(ctx)
    parts = [partition] if partition is not None else _partitions(settings)
    if not parts:
        console.print(f"[red]no feature store under {settings.state_dir / 'featurestore'}[/]")
        raise typer.Exit(1)
    found = 0
    for p in parts:
        try:
            store = open_partition_store(settings, p, read_only=True, wait_s=0)
        except Exception as e:
            console.print(f"[red]partition {p}: cannot open ({e})[/]")
            continue
        with store:
            for uid in _candidates(user_id):
                if not store.has_user(uid):
                    continue
                found += 1
                seq = store.get_sequence(uid, as_of=as_of, limit=store.keep)
                profile = store.user_profile(uid)
                counters = store.user_counters(uid, as_of)
                if as_json:
                    print(json.dumps({"partition": p, "user_id": uid, "profile": profile, "counters": counters,
                                      "sequence": [b._asdict() for b in seq]}))
                else:
                    table = Table("#", "time (UTC)", "ts", "behaviour", "item", "category",
                                  title=f"user {uid!r} in partition {p}: {len(seq)} behaviours")
                    for n, b in enumerate(seq, 1):
                        table.add_row(str(n), _when(b.ts), str(b.ts), b.behavior, repr(b.item_id), repr(b.category_id))
                    console.print(table)
                    console.print(f"impressions: {counters['user_impressions']:.0f}  "
                                  f"clicks: {counters['user_clicks']:.0f}  profile: {profile}")
                break
        if found and not all_:
            break
    if not found:
        console.print(f"user {user_id!r} not found in partitions {parts}")
        raise typer.Exit(1)


@app.command("stats")
def stats(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Users, items, keys, bytes on disk and committed offsets of every partition's store."""
    from featurestore import open_partition_store

    settings = _settings(ctx)
    rows = []
    for p in _partitions(settings):
        try:
            with open_partition_store(settings, p, read_only=True, wait_s=0) as store:
                s = store.stats()
                s["partition"] = p
                s["offsets"] = {f"{t}[{q}]": o for (t, q), o in sorted(store.committed_offsets().items())}
                rows.append(s)
        except Exception as e:
            rows.append({"partition": p, "error": str(e)})
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("partition", "users", "items", "keys", "bytes on disk", "committed offsets",
                  title=f"feature store under {settings.state_dir / 'featurestore'}")
    for s in rows:
        if "error" in s:
            table.add_row(str(s["partition"]), "-", "-", "-", "-", f"[red]{s['error']}[/]")
            continue
        table.add_row(str(s["partition"]), str(s["users"]), str(s["items"]), str(s["keys"]),
                      f"{s['bytes_on_disk']:,}", ", ".join(f"{k}={v}" for k, v in s["offsets"].items()))
    table.add_row("total", str(sum(s.get("users", 0) for s in rows)), str(sum(s.get("items", 0) for s in rows)),
                  str(sum(s.get("keys", 0) for s in rows)), f"{sum(s.get('bytes_on_disk', 0) for s in rows):,}", "")
    console.print(table)
