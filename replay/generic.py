"""Generic logs (CSV with a header, JSON lines, Parquet) through a column mapping.

A row becomes events in one of two ways:
- with a ``behavior`` column, each row is ONE event: ``impression``/``imp``/``show``/``view``/
  ``exposure`` make an :class:`Impression`, ``click``/``pv``/``cart``/``fav``/``buy`` a :class:`Click`;
- without it, each row is an impression, and also a click (same ts and ``request_id``) when the
  ``label`` column is >= ``label_min`` (clk=1, or a rating >= 4 with ``label_min=4``).
The mapping comes from ``--map key=column`` flags or a JSON/TOML file with the same keys.
"""

from __future__ import annotations

import csv
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import orjson

from dmrstream.contracts import BEHAVIORS, Click, Impression
from dmrstream.settings import LimitSettings
from replay.records import BadRow, BadRows, Record, parse_id, parse_ts, scalar

_IMPRESSION_WORDS = {"impression", "imp", "show", "view", "exposure", "expose"}
_CLICK_WORDS = {b: b for b in BEHAVIORS} | {"pv": "click", "clk": "click"}


@dataclass
class ColumnMap:
    """Which source column holds which contract field (``None`` = not in the source)."""

    user: str = "user_id"
    item: str = "item_id"
    category: str | None = "category_id"  # None: every event gets category "unknown"
    ts: str = "ts"
    ts_unit: str = "auto"  # s | ms | us | iso | auto (numbers < 1e11 are seconds)
    label: str | None = None
    label_min: float = 1.0
    behavior: str | None = None
    request_id: str | None = None
    position: str | None = None
    item_features: list[str] = field(default_factory=list)
    user_profile: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    delimiter: str = ","

    @classmethod
    def build(cls, mapping_file: Path | None = None, pairs: list[str] = ()) -> "ColumnMap":
        """From a JSON/TOML file, then ``key=value`` pairs (lists comma-separated) over it."""
        data: dict[str, Any] = {}
        if mapping_file is not None:
            text = Path(mapping_file).read_text()
            data = tomllib.loads(text) if str(mapping_file).endswith(".toml") else json.loads(text)
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--map expects key=column, got {pair!r}")
            data[key.strip()] = value.strip()
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown mapping key {key!r}; known: {', '.join(known)}")
            if key in ("item_features", "user_profile", "context"):
                value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            elif key == "label_min":
                value = float(value)
            elif isinstance(value, str) and value.strip().lower() in ("", "none", "null") and key in (
                    "category", "label", "behavior", "request_id", "position"):
                value = None
            out[key] = value
        m = cls(**out)
        if m.ts_unit not in ("s", "ms", "us", "iso", "auto"):
            raise ValueError(f"ts_unit must be s, ms, us, iso or auto, not {m.ts_unit!r}")
        return m


def rows(path: Path, fmt: str, delimiter: str = ",") -> Iterator[tuple[int, dict | None, str]]:
    """(row number, row dict or None if unreadable, reason) of a csv/jsonl/parquet file."""
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            for parts in reader:
                if not parts:
                    continue
                if len(parts) != len(header):
                    yield reader.line_num, None, f"expected {len(header)} fields, got {len(parts)}"
                else:
                    yield reader.line_num, dict(zip(header, parts)), ""
    elif fmt == "jsonl":
        with open(path, "rb") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield line_no, None, "not valid JSON"
                    continue
                yield (line_no, obj, "") if isinstance(obj, dict) else (line_no, None, "not a JSON object")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
            for obj in batch.to_pylist():
                n += 1
                yield n, obj, ""
    else:
        raise ValueError(f"unknown generic format {fmt!r}")


def read_generic(path: Path, fmt: str, mapping: ColumnMap, source: int, bad: BadRows,
                 limits: LimitSettings, tag: str | None = None) -> Iterator[Record]:
    """Records of one generic file in file order (the caller sorts by time)."""
    tag = tag or path.name
    m = mapping
    for row_no, row, reason in rows(path, fmt, m.delimiter):
        try:
            if row is None:
                raise BadRow(reason)
            yield Record(*_events(row, row_no, tag, m, source, limits))
        except BadRow as e:
            bad.add(tag, row_no, str(e))


def _events(row: dict, row_no: int, tag: str, m: ColumnMap, source: int,
            limits: LimitSettings) -> tuple[int, int, int, tuple]:
    user = parse_id(row.get(m.user), "user", limits)
    item = parse_id(row.get(m.item), "item", limits)
    cat = parse_id(row.get(m.category), "category", limits) if m.category else "unknown"
    ts = parse_ts(row.get(m.ts), m.ts_unit, limits)
    rid = str(row[m.request_id]).strip() if m.request_id and row.get(m.request_id) not in (None, "") else None
    if rid is not None and len(rid) > limits.max_id_length:
        raise BadRow(f"request_id: longer than {limits.max_id_length}")
    base = f"{tag}:{row_no}"
    if m.behavior:
        word = str(row.get(m.behavior, "")).strip().lower()
        if word in _CLICK_WORDS:
            beh = _CLICK_WORDS[word]
            return ts, source, row_no, (Click(event_id=f"{base}:{'c' if beh == 'click' else beh}", user_id=user,
                                              item_id=item, category_id=cat, ts=ts, behavior=beh, request_id=rid),)
        if word not in _IMPRESSION_WORDS:
            raise BadRow(f"behavior: unknown value {word[:20]!r}")
        return ts, source, row_no, (_impression(row, base, user, item, cat, ts, rid, m, limits),)
    clicked = False
    if m.label:
        try:
            clicked = float(row.get(m.label)) >= m.label_min
        except (TypeError, ValueError):
            raise BadRow(f"label: {str(row.get(m.label))[:20]!r} is not a number") from None
    rid = rid or base
    imp = _impression(row, base, user, item, cat, ts, rid, m, limits)
    if not clicked:
        return ts, source, row_no, (imp,)
    return ts, source, row_no, (imp, Click(event_id=base + ":c", user_id=user, item_id=item, category_id=cat, ts=ts,
                                           request_id=rid))


def _impression(row: dict, base: str, user, item, cat, ts: int, rid, m: ColumnMap, limits: LimitSettings) -> Impression:
    position = None
    if m.position and row.get(m.position) not in (None, ""):
        try:
            position = int(row[m.position])
        except (TypeError, ValueError):
            raise BadRow(f"position: {str(row[m.position])[:20]!r} is not an integer") from None
        if not 0 <= position <= 10_000:
            raise BadRow(f"position: {position} outside 0..10000")
    return Impression(event_id=base + ":i", user_id=user, item_id=item, category_id=cat, ts=ts, request_id=rid,
                      position=position, item_features=_fmap(row, m.item_features, limits),
                      user_profile=_fmap(row, m.user_profile, limits), context=_fmap(row, m.context, limits))


def _fmap(row: dict, cols: list[str], limits: LimitSettings) -> dict | None:
    if not cols:
        return None
    out = {c[:64]: v for c in cols if (v := scalar(row.get(c))) is not None}
    return dict(list(out.items())[:limits.max_fields]) or None
