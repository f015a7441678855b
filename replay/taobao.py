"""Taobao UserBehavior CSV (``user,item,category,behavior,timestamp``; behaviours pv/cart/fav/buy).

The log holds behaviours only, no impressions that were not clicked:
- ``pv`` becomes an :class:`Impression` and its :class:`Click` (same ts and ``request_id``);
- ``cart``/``fav``/``buy`` become a :class:`Click` with that ``behavior`` (sequence only);
- :func:`add_negatives` adds K sampled impressions per pv (``sampled=True``, no click, so label 0)
  to make training samples. Items are drawn by popularity *so far*: uniformly from a ring buffer of
  the last ``pool`` pv items, which is proportional to recent pv counts, uses no future data and
  bounded memory. Deterministic for a given seed and input order.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Iterator

from dmrstream.contracts import Click, Impression
from dmrstream.settings import LimitSettings
from replay.records import BadRow, BadRows, Record, parse_id, parse_ts

_BEHAVIORS = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "buy", "click": "click"}


def read_taobao(path: Path, source: int, bad: BadRows,
                limits: LimitSettings, tag: str | None = None) -> Iterator[Record]:
    """Records of a UserBehavior file in file order (the caller sorts by time)."""
    tag = tag or path.name
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.rstrip("\r\n").split(",")
            try:
                if len(parts) != 5:
                    raise BadRow(f"expected 5 comma-separated fields, got {len(parts)}")
                user_s, item_s, cat_s, beh, ts_s = parts
                if line_no == 1 and not ts_s.strip().isdigit() and beh.strip().lower() == "behavior":
                    continue  # an optional header line
                behavior = _BEHAVIORS.get(beh.strip().lower())
                if behavior is None:
                    raise BadRow(f"unknown behavior {beh[:20]!r} (pv/cart/fav/buy)")
                user = parse_id(user_s, "user_id", limits)
                item = parse_id(item_s, "item_id", limits)
                cat = parse_id(cat_s, "category_id", limits)
                ts = parse_ts(ts_s, "s", limits)
            except BadRow as e:
                if line.strip():
                    bad.add(tag, line_no, str(e))
                continue
            rid = f"{tag}:{line_no}"
            if beh.strip().lower() == "pv":
                yield Record(ts, source, line_no, (
                    Impression(event_id=rid + ":i", user_id=user, item_id=item, category_id=cat, ts=ts, request_id=rid),
                    Click(event_id=rid + ":c", user_id=user, item_id=item, category_id=cat, ts=ts, request_id=rid)))
            else:
                yield Record(ts, source, line_no, (
                    Click(event_id=f"{rid}:{behavior}", user_id=user, item_id=item, category_id=cat, ts=ts,
                          behavior=behavior),))


def add_negatives(records: Iterable[Record], k: int, seed: int, tag: str, pool: int = 100_000) -> Iterator[Record]:
    """Insert ``k`` sampled impressions after each pv impression of a time-ordered stream.

    Each negative has id ``"{tag}:{line}:n{j}"`` and its own ``request_id`` (the join matches
    clicks one-to-one by request id), the pv's user and ts, and an item from the pool that is not
    the pv's item. The first pv has no earlier items to draw from and gets none.
    """
    if k <= 0:
        yield from records
        return
    rng = random.Random(f"{seed}:{tag}")
    ring: list[tuple[object, object]] = []
    at = 0
    for rec in records:
        first = rec.events[0]
        if not isinstance(first, Impression) or len(rec.events) < 2 or first.sampled:
            yield rec
            continue
        negatives = []
        if ring:
            for j in range(k):
                item, cat = ring[rng.randrange(len(ring))]
                if item == first.item_id:
                    item, cat = ring[rng.randrange(len(ring))]
                    if item == first.item_id:
                        continue
                rid = f"{first.request_id}:n{j}"
                negatives.append(Impression(event_id=rid, user_id=first.user_id, item_id=item, category_id=cat,
                                            ts=first.ts, request_id=rid, sampled=True))
        if len(ring) < pool:
            ring.append((first.item_id, first.category_id))
        else:
            ring[at] = (first.item_id, first.category_id)
            at = (at + 1) % pool
        yield rec._replace(events=(first, *negatives, *rec.events[1:]))
