"""JSON lines of contract events (what ``simulate --out`` and the file sink write), read back.

Each line is one encoded :class:`Impression` or :class:`Click`. Decoding is strict (the same codec
as the streamer), so a line that the streamer would dead-letter is a bad row here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dmrstream.contracts import Click, Codec, ContractError, Impression
from dmrstream.settings import LimitSettings
from replay.records import BadRows, Record


def looks_like_events(path: Path) -> bool:
    """True when the first non-empty line decodes as an Impression or a Click."""
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    return _decode(line.strip(), Codec(Impression), Codec(Click)) is not None
    except (OSError, ContractError):
        return False
    return False


def _decode(raw: bytes, imp: Codec, click: Codec):
    # Only clicks have a "behavior" field: try the likely contract first, the other one second.
    likely, other = (click, imp) if b'"behavior"' in raw else (imp, click)
    try:
        return likely.decode(raw)
    except ContractError as first:
        try:
            return other.decode(raw)
        except ContractError:
            raise first from None  # the reason for the contract the line looks like it meant


def read_events(path: Path, source: int, bad: BadRows,
                limits: LimitSettings, tag: str | None = None) -> Iterator[Record]:
    """One record per line, in file order (the caller sorts by time)."""
    imp, click = Codec(Impression, limits), Codec(Click, limits)
    tag = tag or path.name
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            raw = line.strip()
            if not raw:
                continue
            try:
                event = _decode(raw, imp, click)
            except ContractError as e:
                bad.add(tag, line_no, e.reason)
                continue
            yield Record(event.ts, source, line_no, (event,))
