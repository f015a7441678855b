"""What every source parser yields, and the small validated conversions they share.

A :class:`Record` is one source row turned into events (an impression, its click, sampled
negatives...). Records carry their merge key ``(ts, source, row)`` so the merged stream, and
therefore every event id, is the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple, Union

from dmrstream.contracts import Click, Impression
from dmrstream.settings import LimitSettings

Event = Union[Impression, Click]


class Record(NamedTuple):
    """Events from one row of one source, in the order they must be sent (impression first)."""

    ts: int  # epoch ms: the merge key's first part
    source: int  # index of the source on the command line: ties broken by it, then by row
    row: int  # 1-based line number in the source file (header included): ids and bad-row reports
    events: tuple[Event, ...]


class ReplayError(Exception):
    """A bad row under ``--strict``, or a source that cannot be read at all."""


class BadRow(ValueError):
    """Raised by a parser helper for one row; the row is counted and skipped."""


@dataclass
class BadRows:
    """Counts bad rows per source and keeps the first few with their line numbers and reasons."""

    keep: int = 10
    strict: bool = False
    count: int = 0
    first: list[tuple[str, int, str]] = field(default_factory=list)  # (source tag, line, reason)

    def add(self, source: str, line: int, reason: str) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append((source, line, reason))
        if self.strict:
            raise ReplayError(f"{source}:{line}: {reason}")


def parse_id(value: object, name: str, limits: LimitSettings) -> int | str:
    """An id as the source gives it: non-negative integers stay integers, other text is a string."""
    if isinstance(value, bool) or value is None:
        raise BadRow(f"{name}: missing")
    if isinstance(value, int):
        if value < 0 or value >= 1 << 63:
            raise BadRow(f"{name}: {value} out of range")
        return value
    if isinstance(value, float):
        if not value.is_integer() or value < 0:
            raise BadRow(f"{name}: {value!r} is not an id")
        return int(value)
    s = str(value).strip()
    if not s:
        raise BadRow(f"{name}: empty")
    if s.isascii() and s.isdigit() and len(s) < 19:
        return int(s)
    if len(s) > limits.max_id_length:
        raise BadRow(f"{name}: longer than {limits.max_id_length}")
    return s


_UNIT_MS = {"s": 1000, "ms": 1, "us": 0.001}


def parse_ts(value: object, unit: str, limits: LimitSettings) -> int:
    """Epoch milliseconds from seconds/ms/us numbers, ISO-8601 text (naive means UTC), or
    ``auto`` (numbers below 1e11 are seconds, else milliseconds). Checked against the limits."""
    if value is None or isinstance(value, bool):
        raise BadRow("ts: missing")
    try:
        if isinstance(value, datetime):
            ms = _iso_ms(value)
        elif unit == "iso" or (unit == "auto" and isinstance(value, str) and not _numeric(value)):
            ms = _iso_ms(datetime.fromisoformat(str(value).strip()))
        else:
            num = float(value)
            if num != num:
                raise ValueError("NaN")
            scale = (1000 if abs(num) < 1e11 else 1) if unit == "auto" else _UNIT_MS[unit]
            ms = int(round(num * scale))
    except (ValueError, TypeError, OverflowError, KeyError):
        raise BadRow(f"ts: cannot read {str(value)[:40]!r} as {unit}") from None
    if not limits.min_ts_ms <= ms <= limits.max_ts_ms:
        raise BadRow(f"ts: {ms} ms outside 1990..2100 (wrong unit?)")
    return ms


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _iso_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


def parse_time_arg(text: str | None) -> int | None:
    """``--from``/``--until``: ISO date or datetime (UTC if naive), or epoch seconds/ms."""
    if text is None:
        return None
    try:
        return parse_ts(text, "auto", LimitSettings())
    except BadRow as e:
        raise ValueError(f"not a time: {text!r} ({e})") from None


def scalar(value: object) -> int | float | str | bool | None:
    """A value for a flat feature map (``item_features``/``user_profile``/``context``); None drops it."""
    if value is None or value == "":
        return None
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) < 1e30 else None
    s = str(value).strip()
    if not s:
        return None
    if s.lstrip("-").isdigit() and len(s) < 18:
        return int(s)
    if s[0] in "-.0123456789" and _numeric(s):
        f = float(s)
        return f if abs(f) < 1e30 else s[:256]
    return s[:256]
