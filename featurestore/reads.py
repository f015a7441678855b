"""Records -> model-ready arrays (pure, vectorised: one numpy pass for the whole batch)."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np

from featurestore import logic
from featurestore.codec import (BEHAVIOR_NAMES, FormatError, ItemRecord, SequenceView, UserRecord, decode,
                                decode_sequences, unpack_ids)

_BEHAVIORS = attrgetter("behaviors")
COUNTER_KEYS = ("user_impressions", "user_clicks", "item_impressions", "item_clicks")


@dataclass
class SequenceBatch:
    """Behaviour sequences of ``n`` users, left-padded to ``T``: the most recent behaviour is at
    column ``T-1`` (the Alimama reference layout).

    ``item_ids`` / ``category_ids`` hold the ids as the events gave them: ``int64`` when every
    id in the batch is an int, otherwise an ``object`` array of ints and strings (the model
    hashes them). Padding is 0 in every array; ``mask`` says which cells are real.
    ``behaviors`` uses the codes 1=click 2=cart 3=fav 4=buy (0 = padding)."""

    user_ids: list
    item_ids: np.ndarray      # (n, T) int64 or object
    category_ids: np.ndarray  # (n, T) int64 or object
    behaviors: np.ndarray     # (n, T) int8
    ts: np.ndarray            # (n, T) int64, event ms
    mask: np.ndarray          # (n, T) bool
    lengths: np.ndarray       # (n,) int64: real behaviours per row


def _ids_array(columns: list, n: int, T: int, dest: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if set(map(type, columns)) <= {bytes}:  # every id an int: no Python objects at all
        src = np.frombuffer(b"".join(columns), dtype="<i8")
    else:
        flat = list(chain.from_iterable(map(unpack_ids, columns)))
        src = np.array(flat, dtype=np.int64 if set(map(type, flat)) <= {int} else object)
    out = np.zeros(n * T, dtype=src.dtype)
    out[dest] = src[idx]
    return out.reshape(n, T)


def fill_sequences(user_ids: list, raws: list, as_of: Any, T: int) -> SequenceBatch:
    """Arrays for the users whose records are ``raws`` (None for unknown users)."""
    n = len(user_ids)
    recs = decode_sequences(raws)
    lengths = np.zeros(n, dtype=np.int64)
    present = np.array(raws, dtype=object) != None  # noqa: E711 (elementwise, C speed)
    if len(recs) != present.sum():
        raise FormatError("user record of an unknown format version")
    lengths[present] = list(map(len, map(_BEHAVIORS, recs)))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    row_of = np.repeat(np.arange(n), lengths)
    flat_ts = np.frombuffer(b"".join(r.ts for r in recs), dtype="<i8")
    # Behaviours strictly before as_of form a prefix of each (sorted) sequence.
    if as_of is None:
        count = lengths
    else:
        times = np.broadcast_to(np.asarray(as_of, dtype=np.int64), (n,))
        before = np.concatenate(([0], np.cumsum(flat_ts < times[row_of])))
        count = before[ends] - before[starts]
    # Flat index j of row r goes to column T - count[r] + (j - starts[r]) when that is in [0, T)
    # and j is among the first count[r]: the window [starts + count - min(count, T), starts + count).
    take = np.minimum(count, T)
    lo = starts + count - take
    idx = np.repeat(lo - np.cumsum(take) + take, take) + np.arange(int(take.sum()))
    dest = np.repeat(np.arange(n) * T + T - take, take) + (idx - np.repeat(lo, take))
    flat = np.zeros(n * T, dtype=np.int64)
    flat[dest] = flat_ts[idx]
    codes = np.zeros(n * T, dtype=np.int8)
    codes[dest] = np.frombuffer(b"".join(r.behaviors for r in recs), dtype=np.int8)[idx]
    mask = np.zeros(n * T, dtype=bool)
    mask[dest] = True
    items = _ids_array([r.items for r in recs], n, T, dest, idx)
    cats = _ids_array([r.cats for r in recs], n, T, dest, idx)
    return SequenceBatch(list(user_ids), items, cats, codes.reshape(n, T), flat.reshape(n, T),
                         mask.reshape(n, T), take)


def counters_dict(raw_user: bytes | None, raw_item: bytes | None, as_of: int | None) -> dict[str, float]:
    """The four point-in-time counters (0 for an unknown user or item)."""
    out = dict.fromkeys(COUNTER_KEYS, 0.0)
    if raw_user is not None:
        user = decode(UserRecord, raw_user)
        out["user_impressions"] = float(logic.counter_as_of(user.impressions, as_of))
        out["user_clicks"] = float(logic.counter_as_of(user.clicks, as_of))
    if raw_item is not None:
        item = decode(ItemRecord, raw_item)
        out["item_impressions"] = float(logic.counter_as_of(item.impressions, as_of))
        out["item_clicks"] = float(logic.counter_as_of(item.clicks, as_of))
    return out


_EMPTY: tuple = ([], [], b"", array("q"))  # an unknown user: only ever sliced, never changed


def history_columns(keys: list[bytes], raws: dict[bytes, bytes | None], as_of: list[int], limit: int) -> list[tuple]:
    """Per (user record key, time): the newest ``limit`` kept behaviours strictly before the time,
    oldest first, as ``(items, categories, behaviour names, timestamps)`` lists. ``raws`` maps each
    key to its encoded user record (None: unknown user); each is decoded once."""
    columns: dict[bytes, tuple] = {}
    out = []
    names = BEHAVIOR_NAMES
    for key, t in zip(keys, as_of):
        cols = columns.get(key)
        if cols is None:
            raw = raws[key]
            if raw is None:
                cols = _EMPTY
            else:
                view = decode(SequenceView, raw)
                cols = (unpack_ids(view.items), unpack_ids(view.cats), view.behaviors, array("q", view.ts))
            columns[key] = cols
        items, cats, codes, ts = cols
        end = bisect_left(ts, t)
        start = end - limit if end > limit else 0
        out.append((items[start:end], cats[start:end], [names[c] for c in codes[start:end]], ts[start:end].tolist()))
    return out
