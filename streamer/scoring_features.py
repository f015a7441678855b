"""Feature-store reads for scorers: read-only views of the partition stores the streamer owns.

Only the streamer worker that owns a partition may open its RocksDB for writing; a scorer opens
it read-only, like ``dmrstream features show`` does. A read-only RocksDB handle sees the database
as it was when opened, so a background thread reopens each view every ``store_refresh_s`` and
swaps it in; the replaced handle is closed one period later (a pass may still be reading it).
Requests for a partition with no store yet score with an empty history (a cold user).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

from kafka.partitioner.default import murmur2

from dmrstream.contracts import ScoreRequest
from featurestore import PartitionStore, open_partition_store, partition_path
from streamer.scoring import UserFeatures

log = logging.getLogger(__name__)


def partition_of(user_id: Any, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a user key (``str(user_id)``), i.e. the
    partition whose feature store holds the user."""
    return (murmur2(str(user_id).encode()) & 0x7FFFFFFF) % partitions


def features_from_store(store: PartitionStore | None, requests: Sequence[ScoreRequest]) -> list[UserFeatures]:
    """Sequences strictly before each request's time, the profile, and per-candidate counters
    (one multi-get for the counters of every candidate of the pass)."""
    if store is None:
        return [UserFeatures.empty() for _ in requests]
    users = [r.user_id for r in requests for _ in r.candidates]
    counters = store.counters_many(users, [c.item_id for r in requests for c in r.candidates],
                                   [r.ts for r in requests for _ in r.candidates])
    out, i = [], 0
    for r in requests:
        seq = store.get_sequence(r.user_id, as_of=r.ts)
        n = len(r.candidates)
        out.append(UserFeatures([b.item_id for b in seq], [b.category_id for b in seq], [b.behavior for b in seq],
                                [b.ts for b in seq], store.user_profile(r.user_id), counters[i:i + n]))
        i += n
    return out


class StoreFeatures:
    """Read-only, periodically refreshed views of every partition's feature store."""

    def __init__(self, settings: Any, refresh: bool = True):
        self.settings = settings
        self.partitions = settings.topics.partitions
        self._views: dict[int, PartitionStore] = {}
        self._retired: list[PartitionStore] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if refresh:
            self._thread = threading.Thread(target=self._refresh_loop, daemon=True, name="scorer-store-refresh")
            self._thread.start()

    def _open(self, p: int) -> PartitionStore | None:
        if not (partition_path(self.settings, p) / "CURRENT").exists():
            return None  # the streamer has not created this partition's store (yet)
        try:
            return open_partition_store(self.settings, p, read_only=True, wait_s=0)
        except Exception as e:  # e.g. mid-creation by the owner: next refresh tries again
            log.debug("partition %d: cannot open read-only (%s)", p, e)
            return None

    def view(self, p: int) -> PartitionStore | None:
        store = self._views.get(p)
        if store is None:
            store = self._open(p)
            if store is not None:
                with self._lock:
                    self._views.setdefault(p, store)
        return store

    def lookup(self, requests: Sequence[ScoreRequest], partitions: Sequence[int | None]) -> list[UserFeatures]:
        out: list[UserFeatures] = [UserFeatures.empty()] * len(requests)
        by_part: dict[int, list[int]] = {}
        for k, (r, p) in enumerate(zip(requests, partitions)):
            by_part.setdefault(partition_of(r.user_id, self.partitions) if p is None else p, []).append(k)
        for p, idx in by_part.items():
            for k, f in zip(idx, features_from_store(self.view(p), [requests[k] for k in idx])):
                out[k] = f
        return out

    def refresh(self) -> None:
        """Reopen every view so it sees the owner's recent writes."""
        with self._lock:
            for store in self._retired:  # replaced a period ago: no pass reads them any more
                store.close()
            self._retired = []
        for p in range(self.partitions):
            new = self._open(p)
            if new is None:
                continue
            with self._lock:
                old = self._views.get(p)
                self._views[p] = new
                if old is not None:
                    self._retired.append(old)

    def _refresh_loop(self) -> None:
        period = self.settings.scorer.store_refresh_s
        while not self._stop.wait(period):
            try:
                self.refresh()
            except Exception:
                log.exception("feature-store refresh failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for store in [*self._views.values(), *self._retired]:
                store.close()
            self._views, self._retired = {}, []
