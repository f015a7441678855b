"""Pure state transitions of the feature store: sequences, dedupe, point-in-time counters.

No I/O: :class:`~featurestore.store.PartitionStore` reads records, calls these, writes them back.

**Sequences** keep a user's newest ``keep`` behaviours ordered by ``(ts, event hash)``, so the
result is the same whatever order (or how many times) events arrive. The kept behaviours' event
hashes are the dedupe memory for behaviours: a behaviour already kept is a duplicate; one older
than the oldest kept behaviour of a full sequence is *too old*: it could not enter the sequence
anyway, and since it may be a forgotten duplicate it is not counted either.

**Impressions** are remembered in a bounded FIFO of event hashes (``dedupe_ids_per_user``). When
an id is forgotten, its ts raises a floor; an unknown impression at or below the floor may be a
forgotten duplicate, so it is dropped (never double counted; a genuinely new impression that late
is under-counted).

**Counters** ``[total, t1, b1, ..., tR, bR]``: the total and, for the R newest distinct event times
``t`` seen, ``b`` = number of events strictly before ``t``. ``as_of(t)`` is exact for every
``t >= t1`` (with R=1 this is the classic (total, last_ts, count_at_last_ts)) and for every ``t``
while no time was ever forgotten; for a ``t`` older than the kept times it returns ``b1``, which
may include events in ``[t, t1)`` (documented approximation: it needs out-of-order reads or
events more than R distinct times in the past).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from operator import itemgetter
from struct import Struct
from typing import Any

from featurestore.codec import DedupeRecord, ItemRecord, UserRecord, event_hash_packed, pack_ids, unpack_ids

_KEY = itemgetter(0, 1)
_I64, _U64 = Struct("<q"), Struct("<Q")


def empty_counter() -> list[int]:
    return [0]


def counter_add(c: list[int], ts: int, points: int) -> None:
    """Count one event at ``ts`` in counter ``c`` (in place)."""
    total = c[0]
    c[0] = total + 1
    n = len(c)
    if n == 1 or ts > c[n - 2]:  # in-order fast path: a new newest time
        c.append(ts)
        c.append(total)
        if len(c) > 1 + 2 * points:
            del c[1:3]
        return
    if ts < c[1]:  # older than every kept time
        if c[2] == 0 and n < 1 + 2 * points:
            c[1:1] = [ts, 0]  # nothing is older (nothing was ever trimmed): a new exact time
            n += 2
            start = 4
        else:
            start = 2
        for j in range(start, n, 2):
            c[j] += 1
        return
    # ts within the kept window: every event time >= t1 is kept, so the point for ts either
    # exists or, inserted now, has as many events before it as the next point.
    j = 1
    while c[j] < ts:
        j += 2
    if c[j] != ts:
        c[j:j] = [ts, c[j + 1]]  # as many events before it as before the next kept time
        if len(c) > 1 + 2 * points:
            del c[1:3]
            j -= 2
    for k in range(j + 3, len(c), 2):  # the counts of the later kept times
        c[k] += 1


def counter_extend(c: list[int], times: list[int], points: int) -> None:
    """``counter_add`` of every time in ``times`` (sorted ascending), in one pass when they are
    all newer than the kept times (a stream in order: the usual case)."""
    n = len(c)
    if n > 1 and times[0] <= c[n - 2]:
        for ts in times:
            counter_add(c, ts, points)
        return
    total, prev = c[0], None
    for ts in times:
        if ts != prev:  # a new distinct time: the events before it are the total so far
            c.append(ts)
            c.append(total)
            prev = ts
        total += 1
    c[0] = total
    excess = len(c) - 1 - 2 * points
    if excess > 0:  # keep the newest ``points`` times, as counter_add's trimming does
        del c[1:1 + excess]


def counter_as_of(c: list[int], as_of: int | None) -> int:
    """Events counted strictly before ``as_of`` (all of them when ``as_of`` is None)."""
    n = len(c)
    if as_of is None or n == 1 or as_of > c[n - 2]:
        return c[0]
    for j in range(1, n, 2):
        if c[j] >= as_of:
            return c[j + 1]
    return c[0]  # unreachable: as_of <= the newest point


def counter_as_of_each(c: list[int], times: list[int]) -> list[float]:
    """:func:`counter_as_of` of each time, as floats (the feature values), in one call: most
    times are after the newest kept one (a stream in order) and count everything."""
    n, total = len(c), float(c[0])
    newest = c[n - 2] if n > 1 else None
    return [total if newest is None or t > newest else float(counter_as_of(c, t)) for t in times]


def contains_hash(blob: bytes | bytearray, packed: bytes) -> bool:
    """Whether the 8-byte ``packed`` hash is one of the aligned entries of ``blob`` (C-speed)."""
    i = blob.find(packed)
    while i != -1 and i % 8:
        i = blob.find(packed, i + 1)
    return i != -1


class Outcome:
    """Per-batch tallies (kept as plain ints for speed)."""

    __slots__ = ("behaviours", "impressions", "duplicates", "too_old", "expired", "rejected")

    def __init__(self) -> None:
        self.behaviours = self.impressions = self.duplicates = 0
        self.too_old = self.expired = self.rejected = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def merge_behaviours(user: UserRecord, dd: DedupeRecord, new: list[tuple], keep: int,
                     out: Outcome) -> list[tuple]:
    """Add behaviours ``(ts, hash, item, cat, code)`` to the user's sequence; returns the ones
    that were accepted (neither duplicate nor too old), sorted by (ts, hash), for the counters."""
    ts_b, hashes = user.ts, dd.seq_hashes
    n = len(ts_b) >> 3
    new.sort(key=_KEY)
    newest = (_I64.unpack_from(ts_b, 8 * n - 8)[0], _U64.unpack_from(hashes, 8 * n - 8)[0]) if n else None
    floor = (_I64.unpack_from(ts_b, 0)[0], _U64.unpack_from(hashes, 0)[0]) if n >= keep else None
    fresh: set[int] = set()
    accepted = []
    for ev in new:
        key = (ev[0], ev[1])
        if floor is not None and key < floor:
            out.too_old += 1
        # The kept hashes stay packed: one C-speed find per event (an aligned match is rare,
        # only then the alignment check), instead of building a set of them per user.
        elif ev[1] in fresh or (hashes.find(p := ev[1].to_bytes(8, "little")) != -1
                                and contains_hash(hashes, p)):
            out.duplicates += 1
        else:
            fresh.add(ev[1])
            accepted.append(ev)
    if not accepted:
        return accepted
    in_order = newest is None or _KEY(accepted[0]) > newest
    if in_order and type(user.items) is bytes and type(user.cats) is bytes:
        # Common case: newer behaviours, int ids: append packed bytes, no list round trip.
        new_ts, new_h, new_items, new_cats, new_codes = zip(*accepted)  # columns in one C call
        new_items, new_cats = pack_ids(new_items), pack_ids(new_cats)
        if type(new_items) is bytes and type(new_cats) is bytes:
            cut = max(0, n + len(accepted) - keep)
            user.ts = (ts_b + array("q", new_ts).tobytes())[8 * cut:]
            user.items = (user.items + new_items)[8 * cut:]
            user.cats = (user.cats + new_cats)[8 * cut:]
            user.behaviors = (user.behaviors + bytes(new_codes))[cut:]
            dd.seq_hashes = (hashes + array("Q", new_h).tobytes())[8 * cut:]
            return accepted
    ts_l, h_l = array("q", ts_b).tolist(), array("Q", hashes).tolist()
    items, cats, codes = unpack_ids(user.items), unpack_ids(user.cats), user.behaviors
    if in_order:
        ts_l.extend(e[0] for e in accepted)
        h_l.extend(e[1] for e in accepted)
        items = items + [e[2] for e in accepted]
        cats = cats + [e[3] for e in accepted]
        codes = codes + bytes(e[4] for e in accepted)
    else:  # out of order: full merge (rare; sequences are short)
        rows = sorted([*zip(ts_l, h_l, items, cats, codes), *accepted], key=_KEY)
        ts_l = [r[0] for r in rows]
        h_l = [r[1] for r in rows]
        items = [r[2] for r in rows]
        cats = [r[3] for r in rows]
        codes = bytes(r[4] for r in rows)
    cut = max(0, len(ts_l) - keep)
    user.ts = array("q", ts_l[cut:]).tobytes()
    user.items, user.cats, user.behaviors = pack_ids(items[cut:]), pack_ids(cats[cut:]), codes[cut:]
    dd.seq_hashes = array("Q", h_l[cut:]).tobytes()
    return accepted


def accept_impressions(dd: DedupeRecord, imps: list, limit: int, out: Outcome) -> list:
    """The impressions of ``imps`` (one user's, in time order) not seen before, remembered in the
    user's FIFO of impression ids (then trimmed to ``limit``); repeats and ones at or below the
    floor of forgotten ids are counted in ``out`` and left out."""
    blob, ts_blob = bytearray(dd.imp_hashes), array("q", dd.imp_ts)
    floor = dd.imp_floor_ts
    new = []
    for ev in imps:
        packed = event_hash_packed(ev.event_id)
        # One C-speed find; only a hit needs the alignment check (rare).
        if blob.find(packed) != -1 and contains_hash(blob, packed):
            out.duplicates += 1
        elif ev.ts <= floor:
            out.too_old += 1
        else:
            blob += packed
            ts_blob.append(ev.ts)
            new.append(ev)
    trim_impressions(dd, blob, ts_blob, limit)
    return new


def trim_impressions(dd: DedupeRecord, blob: bytearray, ts_blob: array, limit: int) -> None:
    """Forget the oldest-arrived impression ids beyond ``limit``, raising the floor."""
    extra = len(ts_blob) - limit
    if extra > 0:
        dd.imp_floor_ts = max(dd.imp_floor_ts, max(ts_blob[:extra]))
        del ts_blob[:extra]
        del blob[: 8 * extra]
    dd.imp_hashes = bytes(blob)
    dd.imp_ts = ts_blob.tobytes()


def update_item(item: ItemRecord, ts: int, category: Any, features: dict | None) -> None:
    """Latest-known side features of an item (newest event time wins)."""
    if ts >= item.features_ts:
        item.features_ts = ts
        if category is not None:
            item.category_id = category
        if features:
            item.features = dict(features)
    elif item.category_id is None:
        item.category_id = category


def sequence_before(user: UserRecord, as_of: int | None) -> int:
    """How many kept behaviours are strictly before ``as_of`` (a prefix: they are sorted)."""
    ts_l = array("q", user.ts)
    if as_of is None:
        return len(ts_l)
    return bisect_left(ts_l, as_of)
