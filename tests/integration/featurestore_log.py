"""Deterministic event logs and the plain reference function the feature-store tests compare with."""

from __future__ import annotations

import random

from dmrstream.contracts import Click, Impression
from featurestore.codec import event_hash

T0 = 1_700_000_000_000
BEHAVIORS = ("click", "click", "click", "cart", "fav", "buy")


def event_log(seed: int, n: int, users: int = 300, items: int = 500, dup_rate: float = 0.1,
              same_ts_rate: float = 0.3) -> list:
    """``n`` messages: impressions and behaviours of ``users`` users, mostly in time order, with
    many equal timestamps, ids both int and str, and redelivered duplicates a little later
    (as at-least-once delivery produces them)."""
    rng = random.Random(seed)
    out: list = []
    ts = T0
    while len(out) < n:
        if rng.random() > same_ts_rate:
            ts += rng.randint(1, 5_000)
        if out and rng.random() < dup_rate:
            out.append(out[max(0, len(out) - rng.randint(1, 200))])
            continue
        u = rng.randrange(users)
        user = u if u % 3 else f"u{u}"
        item = rng.randrange(items)
        cat = item % 17 if item % 2 else f"c{item % 17}"
        eid = f"e{seed}-{len(out)}"
        if rng.random() < 0.5:
            out.append(Impression(event_id=eid, user_id=user, item_id=item, category_id=cat, ts=ts,
                                  item_features={"price": item % 7}))
        else:
            out.append(Click(event_id=eid, user_id=user, item_id=item, category_id=cat, ts=ts,
                             behavior=rng.choice(BEHAVIORS)))
    return out


def reference_sequences(events, limit: int) -> dict:
    """user -> [(item, category, behaviour, ts)] oldest first: the newest ``limit`` distinct
    behaviours ordered by (ts, event-id hash) (the store's documented order for equal times)."""
    seen: dict[str, Click] = {}
    for e in events:
        if isinstance(e, Click):
            seen.setdefault(e.event_id, e)
    by_user: dict = {}
    for e in seen.values():
        by_user.setdefault(e.user_id, []).append(e)
    return {u: [(e.item_id, e.category_id, e.behavior, e.ts)
                for e in sorted(evs, key=lambda e: (e.ts, event_hash(e.event_id)))[-limit:]]
            for u, evs in by_user.items()}


def reference_counters(events, user, item, as_of=None) -> dict:
    """The four counters over the distinct events strictly before ``as_of``."""
    seen: dict = {}
    for e in events:
        seen.setdefault(e.event_id, e)
    out = {"user_impressions": 0.0, "user_clicks": 0.0, "item_impressions": 0.0, "item_clicks": 0.0}
    for e in seen.values():
        if as_of is not None and e.ts >= as_of:
            continue
        if isinstance(e, Impression):
            kind = "impressions"
        elif e.behavior == "click":
            kind = "clicks"
        else:
            continue
        if e.user_id == user:
            out[f"user_{kind}"] += 1
        if e.item_id == item:
            out[f"item_{kind}"] += 1
    return out


def store_sequences(store, users, limit: int) -> dict:
    return {u: [tuple(b) for b in store.get_sequence(u, limit=limit)] for u in users}
