"""Event-time order across files: sort each source (in memory, unless told it is sorted), then
``heapq.merge`` with the stable key ``(ts, source, row)``, so order and ids never depend on luck."""

from __future__ import annotations

import heapq
from typing import Iterable, Iterator

from replay.records import BadRows, Record


def merge_key(rec: Record) -> tuple[int, int, int]:
    return rec.ts, rec.source, rec.row


def time_ordered(records: Iterable[Record], presorted: bool, bad: BadRows, tag: str) -> tuple[Iterator[Record], str]:
    """One source's records in event-time order, and how that was obtained.

    Default: the whole file is read into memory and sorted (stably) if it is not in order.
    ``presorted``: streamed in constant memory; a record earlier than its predecessor is a bad row.
    """
    if presorted:
        return _drop_out_of_order(records, bad, tag), "streamed (presorted)"
    buffered = list(records)
    if all(merge_key(a) <= merge_key(b) for a, b in zip(buffered, buffered[1:])):
        return iter(buffered), "in order"
    buffered.sort(key=merge_key)
    return iter(buffered), "sorted in memory"


def _drop_out_of_order(records: Iterable[Record], bad: BadRows, tag: str) -> Iterator[Record]:
    last = -1
    for rec in records:
        if rec.ts < last:
            bad.add(tag, rec.row, f"out of event-time order ({rec.ts} < {last}) in a --presorted source")
            continue
        last = rec.ts
        yield rec


def merge(streams: list[Iterator[Record]]) -> Iterator[Record]:
    """Merge time-ordered streams into one, ties broken by source index then row."""
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=merge_key)


def window(records: Iterable[Record], from_ms: int | None, until_ms: int | None) -> Iterator[Record]:
    """Records with ``from_ms <= ts < until_ms`` (either bound optional); stops at ``until``."""
    for rec in records:
        if from_ms is not None and rec.ts < from_ms:
            continue
        if until_ms is not None and rec.ts >= until_ms:
            return
        yield rec
