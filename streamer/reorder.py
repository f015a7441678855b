"""Merge of the streamer's inputs into one event-time order (pure logic, no I/O).

faust fetches the impressions and clicks topics independently: one can run thousands of events
ahead of the other. Counters and sequences frozen when an impression is processed must count every
earlier click, so events wait here until every input has reached their timestamp: an event is
released when its time is at or below the *merge watermark*, the minimum over the inputs of the
highest event time seen on each (an input marked idle drops out; an input never seen holds
everything back until it is seen or marked idle). Released events come out sorted by (time, input
order, arrival), so at equal times impressions precede clicks. An event older than what was already
released (out of order within its topic) comes out at once.

Buffered events are recorded as key -> bytes puts/deletes (:meth:`drain_changes`), persisted with
the join state once a batch is acknowledged, so events whose offsets are committed are never lost.
An event released in the same batch it arrived in is never written at all.
"""

from __future__ import annotations

import heapq
from typing import Any, Generic, Iterable, TypeVar

T = TypeVar("T")
_EVENT, _HIGH, _RELEASED = b"m/", b"h/", b"r"
_TS_OFFSET = 1 << 63  # signed event time -> unsigned big-endian key that sorts like the time


class EventTimeMerger(Generic[T]):
    """Buffers ``(input, ts, event id, payload)`` until the merge watermark passes ``ts``."""

    def __init__(self, inputs: Iterable[str]):
        self.inputs = tuple(inputs)
        self._order = {name: i for i, name in enumerate(self.inputs)}
        self._order_byte = {name: bytes([i]) for i, name in enumerate(self.inputs)}
        self.high: dict[str, int] = {}
        self.idle: set[str] = set()
        self._heap: list[bytes] = []  # keys sort by (ts, input order, event id)
        self._items: dict[bytes, tuple[str, bytes, T | None]] = {}  # key -> (input, raw, decoded)
        self._changes: dict[bytes, bytes | None] = {}  # deletes and watermarks
        self._added: set[bytes] = set()  # pushed since the last drain, still waiting
        self._high_moved: set[str] = set()
        self.released_to: int | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def watermark(self) -> int | None:
        """Events at or below this time can be released; None while an active input is unseen."""
        active = [self.high.get(name) for name in self.inputs if name not in self.idle]
        if not active or any(ts is None for ts in active):
            return None
        return min(active)

    def set_idle(self, source: str, idle: bool) -> None:
        """Mark an input idle (excluded from the watermark) or active again."""
        (self.idle.add if idle else self.idle.discard)(source)

    def push(self, source: str, ts: int, event_id: str, raw: bytes, decoded: T | None = None) -> None:
        """Buffer one event (a repeat of a buffered event is ignored)."""
        if ts > self.high.get(source, ts - 1):
            self.high[source] = ts
            self._high_moved.add(source)  # written at the next drain, not per event
        if self.idle:
            self.idle.discard(source)
        key = (ts + _TS_OFFSET).to_bytes(8, "big") + self._order_byte[source] + event_id.encode()
        if key in self._items:
            return
        self._items[key] = (source, raw, decoded)
        heapq.heappush(self._heap, key)
        self._added.add(key)  # its value is built only if it still waits at the next drain

    def pop_ready(self) -> list[tuple[str, bytes, T | None]]:
        """Every buffered event at or below the watermark (or the highest watermark reached so far:
        late events), in event-time order."""
        wm = self.watermark
        if wm is not None and (self.released_to is None or wm > self.released_to):
            self.released_to = wm
            self._changes[_RELEASED] = wm.to_bytes(8, "big", signed=True)
        out: list[tuple[str, bytes, T | None]] = []
        if self.released_to is None:
            return out
        limit = (self.released_to + _TS_OFFSET).to_bytes(8, "big")
        while self._heap and self._heap[0][:8] <= limit:
            key = heapq.heappop(self._heap)
            out.append(self._items.pop(key))
            if key in self._added:
                self._added.discard(key)  # pushed and released between two drains: never written
            else:
                self._changes[_EVENT + key] = None
        return out

    # -- persistence ----------------------------------------------------------------------
    def drain_changes(self) -> dict[bytes, bytes | None]:
        """Keys changed since the last call: bytes to put, or None to delete."""
        changes, self._changes = self._changes, {}
        for key in self._added:
            source, raw, _ = self._items[key]
            changes[_EVENT + key] = bytes([self._order[source]]) + raw
        self._added = set()
        for source in self._high_moved:
            changes[_HIGH + source.encode()] = self.high[source].to_bytes(8, "big", signed=True)
        self._high_moved = set()
        return changes

    def restore(self, items: Iterable[tuple[bytes, bytes]], decode: Any = None) -> None:
        """Rebuild from persisted pairs; ``decode(input, raw)`` re-creates the decoded payload."""
        for key, value in items:
            if key == _RELEASED:
                self.released_to = int.from_bytes(value, "big", signed=True)
            elif key.startswith(_HIGH):
                self.high[key[len(_HIGH):].decode()] = int.from_bytes(value, "big", signed=True)
            elif key.startswith(_EVENT):
                k = key[len(_EVENT):]
                source, raw = self.inputs[value[0]], value[1:]
                self._items[k] = (source, raw, decode(source, raw) if decode else None)
                heapq.heappush(self._heap, k)
        self._changes.clear()
        self._added.clear()
        self._high_moved.clear()
