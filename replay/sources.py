"""From command-line paths to one merged, time-ordered stream of records.

Format detection (``--format auto``): a MovieLens directory or ratings file (``*.inter``, ``u.data``);
``raw_sample.csv``/``behavior_log.csv`` (or a directory holding them) as Alimama; a file whose name
contains ``UserBehavior`` as Taobao; ``*.parquet``; ``*.jsonl``/``*.json``/``*.ndjson`` as contract
events when the first line is one, else generic JSON lines; any other ``*.csv`` as generic CSV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from dmrstream.settings import LimitSettings
from replay import alimama, eventsfile, generic, movielens, taobao
from replay.merge import merge, time_ordered, window
from replay.records import BadRows, Record

FORMATS = ("auto", "movielens", "taobao", "alimama", "csv", "jsonl", "parquet", "events")


@dataclass
class ReplayOptions:
    fmt: str = "auto"
    mapping: generic.ColumnMap = field(default_factory=generic.ColumnMap)
    click_threshold: float = 4.0
    negatives: int = 0
    seed: int = 0
    presorted: bool = False
    from_ms: int | None = None
    until_ms: int | None = None


@dataclass
class SourceInfo:
    path: Path
    kind: str
    tag: str
    order: str = ""  # "in order", "sorted in memory", "streamed (presorted)"


def detect(path: Path, fmt: str = "auto") -> list[tuple[Path, str]]:
    """(file, kind) pairs a command-line path stands for; raises ValueError when unknown."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if fmt == "movielens" or (fmt == "auto" and movielens.find_ratings(path)):
        ratings = movielens.find_ratings(path)
        if ratings is None:
            raise ValueError(f"{path}: no MovieLens ratings (*.inter or u.data)")
        return [(ratings, "movielens")]
    if path.is_dir():
        found = [(path / n, k) for n, k in (("raw_sample.csv", "alimama-raw"), ("behavior_log.csv", "alimama-behavior"))
                 if (path / n).is_file()]
        found += [(p, "taobao") for p in sorted(path.glob("*.csv")) if "userbehavior" in p.name.lower()]
        if not found:
            raise ValueError(f"{path}: directory holds no known format (MovieLens, Alimama, UserBehavior)")
        return found
    name = path.name.lower()
    if fmt == "alimama" or (fmt == "auto" and name in ("raw_sample.csv", "behavior_log.csv")):
        if name == "behavior_log.csv":
            return [(path, "alimama-behavior")]
        return [(path, "alimama-raw")]
    if fmt == "taobao" or (fmt == "auto" and "userbehavior" in name):
        return [(path, "taobao")]
    if fmt in ("csv", "jsonl", "parquet", "events"):
        return [(path, fmt)]
    if name.endswith(".parquet"):
        return [(path, "parquet")]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return [(path, "events" if eventsfile.looks_like_events(path) else "jsonl")]
    if name.endswith((".csv", ".tsv", ".txt")):
        return [(path, "csv")]
    raise ValueError(f"{path}: cannot tell the format; pass --format")


def _reader(kind: str, opts: ReplayOptions) -> Callable[..., Iterator[Record]]:
    if kind == "movielens":
        return partial(movielens.read_movielens, click_threshold=opts.click_threshold)
    if kind == "taobao":
        return taobao.read_taobao
    if kind == "alimama-raw":
        return alimama.read_raw_sample
    if kind == "alimama-behavior":
        return alimama.read_behavior_log
    if kind == "events":
        return eventsfile.read_events
    return lambda path, source, bad, limits, tag: generic.read_generic(path, kind, opts.mapping, source, bad,
                                                                       limits, tag=tag)


def open_sources(paths: list[Path], opts: ReplayOptions, bad: BadRows,
                 limits: LimitSettings) -> tuple[Iterator[Record], list[SourceInfo]]:
    """The merged record stream of all ``paths`` and what each source was.

    Sources are read lazily: nothing is parsed until the stream is iterated, and the ``order``
    field of each :class:`SourceInfo` is filled in when its file has been read.
    """
    infos: list[SourceInfo] = []
    seen: dict[str, int] = {}
    for p in paths:
        for file, kind in detect(Path(p), opts.fmt):
            tag = file.name
            seen[tag] = seen.get(tag, 0) + 1
            if seen[tag] > 1:  # same file name from another directory: keep ids distinct
                tag = f"{tag}#{seen[tag]}"
            infos.append(SourceInfo(file, kind, tag))
    streams = [_ordered(i, info, opts, bad, limits) for i, info in enumerate(infos)]
    return window(merge(streams), opts.from_ms, opts.until_ms), infos


def _ordered(index: int, info: SourceInfo, opts: ReplayOptions, bad: BadRows, limits: LimitSettings) -> Iterator[Record]:
    records = _reader(info.kind, opts)(info.path, index, bad, limits, tag=info.tag)
    ordered, info.order = time_ordered(records, opts.presorted, bad, info.tag)
    if info.kind == "taobao" and opts.negatives > 0:
        ordered = taobao.add_negatives(ordered, opts.negatives, opts.seed, info.tag)
    yield from ordered
