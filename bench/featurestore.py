"""Feature-store benchmark (not a test): behaviour appends/s, multi-get latency with ``as_of``,
bytes per user, against raw rocksdict WriteBatch puts and multi-gets measured in the same run.

    .venv/bin/python bench/featurestore.py

Shapes: each batch touches 1,000 distinct users (out of USERS), with K behaviours per user
(K = 10 and K = 1), on items of power-law (Zipf 1.2) popularity among 200,000. Sequences are full (64 kept) before timing, as in steady state. Event objects
are built before the clock starts (decoding is the streamer's cost, not the store's).
The store's write-through record cache (default bound) holds most of this partition's records;
multi-get is also timed with it off, and its hit rates are printed.
The machine is shared (2 cores, other work running): figures are noisy; run twice to compare.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocksdict import Rdict, WriteBatch  # noqa: E402

from dmrstream.contracts import Click  # noqa: E402
from dmrstream.settings import FeatureSettings  # noqa: E402
from featurestore import PartitionStore  # noqa: E402
from featurestore.store import _options  # noqa: E402

USERS, BATCH_USERS, ITEMS, T0 = 20_000, 1_000, 200_000, 1_700_000_000_000
BEHAVIORS = ("click", "click", "click", "cart", "fav", "buy")


class Clock:
    """Event time advancing ~1 s per event, so appends are (mostly) in order as in a stream."""

    def __init__(self) -> None:
        self.ts = T0

    def next(self) -> int:
        self.ts += random.randint(0, 2000)
        return self.ts


def batches(n_batches: int, per_user: int, clock: Clock, tag: str) -> list[list[Click]]:
    out = []
    for b in range(n_batches):
        users = random.sample(range(USERS), BATCH_USERS)
        evs = []
        items = (np.random.zipf(1.2, size=per_user * BATCH_USERS) - 1) % ITEMS  # power-law popularity
        for k in range(per_user):
            for j, u in enumerate(users):
                item = int(items[k * BATCH_USERS + j])
                evs.append(Click(event_id=f"{tag}{b}.{k}.{u}", user_id=u, item_id=item, category_id=item % 5000,
                                 ts=clock.next(), behavior=random.choice(BEHAVIORS)))
        out.append(evs)
    return out


def time_appends(store: PartitionStore, work: list[list[Click]]) -> float:
    n = sum(len(b) for b in work)
    t = time.perf_counter()
    for evs in work:
        store.apply(evs)
    return n / (time.perf_counter() - t)


def time_multi_gets(store: PartitionStore, clock: Clock, n: int = 600) -> list[float]:
    """Latencies (ms) of multi-gets of 256 random users, per-user as_of inside recent history."""
    lat = []
    for _ in range(n):
        users = random.sample(range(USERS), 256)
        as_of = np.random.randint(clock.ts - 3_000_000, clock.ts, size=256)
        t = time.perf_counter()
        batch = store.multi_get(users, as_of=as_of)
        lat.append((time.perf_counter() - t) * 1e3)
    assert batch.mask.any()
    return lat


def hit_rate(before: dict, after: dict) -> float:
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return round(hits / max(1, hits + misses), 3)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> None:
    random.seed(0)
    np.random.seed(0)
    console = Console()
    fs = FeatureSettings()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fs-"))
    clock = Clock()
    with PartitionStore(tmp / "store", fs) as store:
        console.print(f"filling {USERS:,} users to full sequences ({fs.seq_len + fs.seq_keep_extra} kept)...")
        for evs in batches(USERS // BATCH_USERS * 7, 10, clock, "fill"):
            store.apply(evs)
        k10 = batches(40, 10, clock, "a")
        k1 = batches(150, 1, clock, "b")
        before = store.cache_stats()
        rate10 = time_appends(store, k10)
        rate1 = time_appends(store, k1)
        append_hits = hit_rate(before, store.cache_stats())
        before = store.cache_stats()
        lat = time_multi_gets(store, clock)
        read_hits = hit_rate(before, store.cache_stats())
        store._db.flush()
        st = store.stats()
        logical = sum(len(v) for k, v in store.snapshot_items() if k[:2] in (b"s/", b"d/"))
        seq_logical = sum(len(v) for k, v in store.snapshot_items() if k[:2] == b"s/")

    # The same reads with the record cache off: what a partition larger than its cache sees.
    with PartitionStore(tmp / "store", fs, record_cache_mb=0) as store:
        time_multi_gets(store, clock, 200)  # warm the fresh handle's block cache first
        lat_nocache = time_multi_gets(store, clock)

    # Baseline: raw rocksdict, same options, values the size of an average user record.
    value = random.randbytes(seq_logical // st["users"])
    raw = Rdict(str(tmp / "raw"), _options(fs, None))
    keys = [b"s/" + u.to_bytes(8, "big") for u in range(USERS)]
    n_puts, t = 0, time.perf_counter()
    for r in range(25):
        wb = WriteBatch(raw_mode=True)
        for k in random.sample(keys, 10_000):
            wb.put(k, value)
        raw.write(wb)
        n_puts += 10_000
    raw_puts = n_puts / (time.perf_counter() - t)
    raw_lat = []
    for _ in range(600):
        ks = random.sample(keys, 256)
        t = time.perf_counter()
        raw.get(ks)
        raw_lat.append((time.perf_counter() - t) * 1e3)
    raw.close()
    raw_mget = 256 / (statistics.mean(raw_lat) / 1e3)

    figures = {
        "appends_per_s_1000users_x10": round(rate10),
        "appends_per_s_1000users_x1": round(rate1),
        "multi_get_256_as_of_p50_ms": round(percentile(lat, 50), 3),
        "multi_get_256_as_of_p99_ms": round(percentile(lat, 99), 3),
        "multi_get_256_as_of_no_record_cache_p50_ms": round(percentile(lat_nocache, 50), 3),
        "multi_get_256_as_of_no_record_cache_p99_ms": round(percentile(lat_nocache, 99), 3),
        "record_cache_hit_rate_appends": append_hits,
        "record_cache_hit_rate_multi_get": read_hits,
        "bytes_per_user_on_disk": round(st["bytes_on_disk"] / st["users"]),
        "bytes_per_user_encoded": round(logical / st["users"]),
        "bytes_per_user_sequence_record": round(seq_logical / st["users"]),
        "raw_writebatch_puts_per_s": round(raw_puts),
        "raw_multi_get_256_p50_ms": round(percentile(raw_lat, 50), 3),
        "raw_multi_get_256_p99_ms": round(percentile(raw_lat, 99), 3),
        "raw_multi_get_keys_per_s": round(raw_mget),
        "append_to_raw_put_ratio_x10": round(rate10 / raw_puts, 3),
        "append_to_raw_put_ratio_x1": round(rate1 / raw_puts, 3),
        "users": st["users"],
    }
    table = Table("figure", "value", "target", title="feature store (2 shared cores; noisy)")
    targets = {"appends_per_s_1000users_x10": ">= 100,000", "multi_get_256_as_of_p99_ms": "<= 2 ms",
               "append_to_raw_put_ratio_x10": ">= 0.5"}
    for k, v in figures.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v), targets.get(k, ""))
    console.print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
