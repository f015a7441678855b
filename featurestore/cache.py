"""Write-through LRU cache of encoded records (user, dedupe, item values).

Valid because one worker owns a partition's database exclusively (RocksDB's lock enforces one
writer): every change to a cached key goes through this process, so the cache never goes stale.
It holds the encoded bytes exactly as written (immutable, not tracked by the garbage collector)
and is updated only AFTER the WriteBatch is written: after a crash the database, not the cache,
is the truth, and a failed write leaves the cache as it was.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable

# Per-entry bookkeeping beyond key and value bytes (dict slot, bytes object headers), so that the
# byte bound is close to the real memory use.
_ENTRY_OVERHEAD = 120


class RecordCache:
    """Bounded (``max_bytes``) cache of ``key -> value or None`` (None: known absent).

    Eviction is in insertion order (FIFO over a plain dict), not LRU: refreshing recency on every
    hit cost more than the RocksDB reads it saved. A hot record that is evicted is read once
    from RocksDB and inserted again, so its cost is one read per pass through the cache."""

    __slots__ = ("_d", "_bytes", "max_bytes", "hits", "misses")

    def __init__(self, max_bytes: int):
        self._d: dict[bytes, bytes | None] = {}
        self._bytes = 0
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    def get_many(self, keys: list[bytes], fetch: Callable[[list[bytes]], list]) -> list:
        """Values of ``keys``; the missing ones come from ``fetch`` (one multi-get) and are kept."""
        if self.max_bytes <= 0:
            return fetch(keys)
        get = self._d.get
        out = [get(k, _MISS) for k in keys]
        if _MISS in out:
            todo = [i for i, v in enumerate(out) if v is _MISS]
            self.misses += len(todo)
            todo_keys = [keys[i] for i in todo]
            got = fetch(todo_keys)
            for i, v in zip(todo, got):
                out[i] = v
            self._put_many(zip(todo_keys, got))
            self.hits += len(keys) - len(todo)
        else:
            self.hits += len(keys)
        return out

    def put_many(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Record values just written (None: deleted). Call only after the write succeeded."""
        if self.max_bytes > 0:
            self._put_many(items)

    def _put_many(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        d = self._d
        size = self._bytes
        get = d.get
        for k, v in items:
            old = get(k, _MISS)
            if old is _MISS:
                size += len(k) + _ENTRY_OVERHEAD
            elif old is not None:
                size -= len(old)
            d[k] = v  # an existing key keeps its place: updates do not refresh it
            if v is not None:
                size += len(v)
        while size > self.max_bytes and d:
            for k in list(islice(d, 64)):  # the oldest, a few at a time (no full copy)
                v = d.pop(k)
                size -= len(k) + (len(v) if v is not None else 0) + _ENTRY_OVERHEAD
        self._bytes = size

    def discard(self, keys: Iterable[bytes]) -> None:
        """Forget ``keys`` (their next read goes to the database)."""
        d = self._d
        for k in keys:
            if k in d:
                v = d.pop(k)
                self._bytes -= len(k) + (len(v) if v is not None else 0) + _ENTRY_OVERHEAD

    def clear(self) -> None:
        self._d.clear()
        self._bytes = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._d), "bytes": self._bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}


_MISS = object()
