"""Plain reference code the pipeline tests check the running system against (no project logic):
where a user's events land, what the streamer's event-time merge has released, which impressions
are settled, the behaviour sequences a feature store must hold, and a stream of good samples."""

from __future__ import annotations

import random
from typing import Any, Iterable

from kafka.partitioner.default import murmur2

from dmrstream.contracts import Click, Impression, Sample

T0 = 1_700_000_000_000


def partition_of(user_id: Any, partitions: int) -> int:
    """Where the default partitioner puts a user's events (murmur2 of the key, as in Kafka)."""
    return (murmur2(str(user_id).encode()) & 0x7FFFFFFF) % partitions


def watermarks(events: Iterable[Impression | Click], partitions: int) -> tuple[dict[int, int], dict[int, int]]:
    """Per partition: the merge watermark (min over the two inputs of the highest ts: events up to
    it are released) and the join's watermark (min over the inputs of the highest released ts)."""
    events = list(events)
    high: dict[tuple, int] = {}
    for e in events:
        key = (partition_of(e.user_id, partitions), type(e))
        high[key] = max(high.get(key, 0), e.ts)
    merge = {p: min(high.get((p, Impression), 0), high.get((p, Click), 0)) for p in range(partitions)}
    released: dict[tuple, int] = {}
    for e in events:
        p = partition_of(e.user_id, partitions)
        if e.ts <= merge[p]:
            released[(p, type(e))] = max(released.get((p, type(e)), 0), e.ts)
    join = {p: min(released.get((p, Impression), 0), released.get((p, Click), 0)) for p in range(partitions)}
    return merge, join


def reference_sequences(events: Iterable[Impression | Click], seq_len: int) -> dict[Any, list[tuple]]:
    """Each user's last ``seq_len`` behaviours (item, category, behaviour, ts), oldest first."""
    per_user: dict[Any, list[tuple]] = {}
    for e in events:
        if isinstance(e, Click):
            per_user.setdefault(e.user_id, []).append((e.item_id, e.category_id, e.behavior, e.ts))
    return {u: sorted(seq, key=lambda b: b[3])[-seq_len:] for u, seq in per_user.items()}


def store_mismatches(settings: Any, expected: dict[Any, list[tuple]]) -> list[str]:
    """Every way the partitions' RocksDB stores differ from ``expected`` (empty: equal)."""
    from featurestore import open_partition_store

    seq_len = settings.features.seq_len
    out: list[str] = []
    seen = set()
    for p in range(settings.topics.partitions):
        store = open_partition_store(settings, p)
        try:
            for user in store.user_ids():
                got = [tuple(b) for b in store.get_sequence(user, limit=seq_len)]
                if got != expected.get(user, []):
                    out.append(f"user {user} (partition {p}): {got[-3:]} vs {expected.get(user, [])[-3:]}")
                seen.add(user)
        finally:
            store.close()
    return out + [f"user {u}: absent from the store" for u in sorted(set(expected) - seen, key=str)]


def random_samples(n: int, seed: int = 3) -> list[Sample]:
    """Good samples: 97 users, 0-7 behaviours each, 40 % positive, one second apart."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        m = rng.randrange(0, 8)
        out.append(Sample(sample_id=f"s{k}", event_id=f"s{k}", user_id=k % 97, item_id=rng.randrange(500),
                          category_id=rng.randrange(20), ts=T0 + k * 1000, label=int(rng.random() < 0.4),
                          hist_item_ids=[rng.randrange(500) for _ in range(m)], hist_category_ids=[1] * m,
                          hist_behaviors=["click"] * m, hist_ts=[T0 - 10_000 + j for j in range(m)],
                          counters={"user_impressions": float(k % 7), "user_clicks": float(k % 3)}))
    return out
