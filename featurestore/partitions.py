"""Partition ownership: one :class:`PartitionStore` per assigned Kafka partition.

Hand-over between workers: the old owner closes the partition's directory (on revoke); the new
owner opens it (same machine or shared volume), or installs a checkpoint the old owner made
(:meth:`PartitionStore.checkpoint` / :meth:`PartitionStore.restore`), or, with nothing at all,
rebuilds by replaying the partition's input topics from the beginning
(:meth:`PartitionStore.rebuild_from`; idempotency makes that exact). The store's committed
offsets tell the consumer where to seek in every case.
"""

from __future__ import annotations

import time
from pathlib import Path

from rocksdict import Cache

from dmrstream.settings import Settings
from featurestore.store import PartitionStore


def partition_path(settings: Settings, partition: int) -> Path:
    """Directory of a partition's store."""
    return Path(settings.state_dir) / "featurestore" / f"p{partition}"


def open_partition_store(settings: Settings, partition: int, *, wait_s: float = 30.0,
                         read_only: bool = False, cache: Cache | None = None) -> PartitionStore:
    """Open a partition's store, waiting up to ``wait_s`` for a previous owner in another
    process to release it (RocksDB's lock file guards against two writers)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return PartitionStore(partition_path(settings, partition), settings, read_only=read_only, cache=cache)
        except Exception as e:  # rocksdict raises a plain Exception for "lock held"
            if "lock" not in str(e).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class FeatureStore:
    """The stores of the partitions this worker owns (one shared block cache)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        mb = settings.features.block_cache_mb
        self._cache = Cache(mb << 20) if mb else None
        self._stores: dict[int, PartitionStore] = {}

    def assign(self, partitions: set[int] | list[int]) -> dict[tuple[str, int], int]:
        """Open the newly assigned partitions; returns their committed offsets to seek to."""
        offsets: dict[tuple[str, int], int] = {}
        for p in partitions:
            if p not in self._stores:
                self._stores[p] = open_partition_store(self.settings, p, cache=self._cache)
            offsets.update(self._stores[p].committed_offsets())
        return offsets

    def revoke(self, partitions: set[int] | list[int]) -> None:
        """Close revoked partitions so their next owner can open them."""
        for p in partitions:
            store = self._stores.pop(p, None)
            if store is not None:
                store.close()

    def partition(self, p: int) -> PartitionStore:
        """The open store of partition ``p`` (KeyError when it is not assigned here)."""
        return self._stores[p]

    @property
    def partitions(self) -> list[int]:
        return sorted(self._stores)

    def close(self) -> None:
        self.revoke(list(self._stores))

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
