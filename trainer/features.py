"""Samples -> fixed-shape tensors: THE one input function shared by the trainer and the scorers.

Ids become embedding rows by a stable hash (splitmix64 of integer ids, blake2b of other strings;
never Python's salted ``hash()``), so unseen ids never fail and every process maps an id to the
same row. Row 0 of every table is reserved for padding. Sequences are left-padded to
``settings.features.seq_len`` with the most recent behaviour last; the position id of a behaviour
is its distance from the most recent one (0 = newest), so the same sequence padded to different
lengths gets the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from hashlib import blake2b
from typing import Any, Mapping, Sequence

import numpy as np

BEHAVIOR_CODES = {"click": 1, "cart": 2, "fav": 3, "buy": 4}  # 0 = padding
NUM_BEHAVIORS = 5
COUNTER_KEYS = ("user_impressions", "user_clicks", "item_impressions", "item_clicks")
# Dense features derived from the counters: log1p of the four counts, smoothed user and item
# click rates and their logits, and a flag telling "no counters" apart from "zero counts".
NUM_DENSE = 9
# Display position of an impression (slot on the page): 0 = unknown (scoring, sources without it),
# else 1 + min(position, POSITION_BUCKETS - 2).
POSITION_BUCKETS = 32

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SALTS = {"item": 0x1F3D5B79, "category": 0x2C4E6A88, "user": 0x3B5D7F91, "field": 0x4A6C8EA2}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser (uint64 in, uint64 out; wrap-around is intended)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=1 << 20)
def _str_key(s: str) -> int:
    """An id given as a string: decimal strings map like the integer (sources mix "5" and 5)."""
    if s.isdigit() and len(s) < 19:
        return int(s)
    return int.from_bytes(blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") | (1 << 63)


def _keys(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """uint64 keys of a flat list of ids (ints fast, strings through a cache)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.uint64, copy=False)
    try:
        return np.asarray(values, dtype=np.int64).astype(np.uint64)
    except (ValueError, TypeError, OverflowError):
        return np.fromiter((_str_key(v) if isinstance(v, str) else int(v) & 0xFFFFFFFFFFFFFFFF
                            for v in values), dtype=np.uint64, count=len(values))


def hash_ids(values: Sequence[Any] | np.ndarray, size: int, kind: str) -> np.ndarray:
    """Rows in ``[1, size)`` for ids of one kind (``item``, ``category``, ``user``, ``field``)."""
    k = _keys(values)
    h = _splitmix64(k ^ np.uint64(_SALTS[kind]))
    return (h % np.uint64(size - 1)).astype(np.int64) + 1


@lru_cache(maxsize=1 << 18, typed=True)  # typed: 1, 1.0 and True are equal keys but different features
def _field_key(name: str, value: Any) -> int:
    return int.from_bytes(blake2b(f"{name}={value}".encode("utf-8"), digest_size=8).digest(), "little")


def hash_field_maps(maps: Sequence[Mapping[str, Any] | None], slots: int, size: int) -> np.ndarray:
    """(B, slots) rows for ``name=value`` features; slot i holds the i-th field by sorted name
    (consistent while the schema is), 0 where absent."""
    out = np.zeros(len(maps) * slots, dtype=np.int64)
    if slots == 0:
        return out.reshape(len(maps), 0)
    at: list[int] = []  # flat positions and keys collected first: one numpy write, not one per field
    keys: list[int] = []
    for b, m in enumerate(maps):
        if m:
            for i, name in enumerate(sorted(m)[:slots]):
                at.append(b * slots + i)
                keys.append(_field_key(name, m[name]))
    if keys:
        k = np.array(keys, dtype=np.uint64)
        out[at] = (_splitmix64(k ^ np.uint64(_SALTS["field"])) % np.uint64(size - 1)).astype(np.int64) + 1
    return out.reshape(len(maps), slots)


def time_gap_bucket(gap_ms: np.ndarray, buckets: int) -> np.ndarray:
    """Log2 buckets of the time between a behaviour and the impression (1 s .. ~2^buckets s)."""
    secs = np.maximum(gap_ms, 0) / 1000.0
    return np.clip(np.floor(np.log2(1.0 + secs)).astype(np.int64), 0, buckets - 2) + 1


@dataclass
class Batch:
    """Fixed-shape model input (numpy on creation; :meth:`to_torch` for the model).

    ids are int64 rows (0 = padding); ``mask`` 1 = real behaviour; ``dense`` = counter features.
    """

    user: Any
    item: Any
    category: Any
    hist_item: Any
    hist_category: Any
    hist_behavior: Any
    hist_position: Any
    hist_gap: Any
    mask: Any
    profile: Any
    context: Any
    item_fields: Any
    dense: Any
    display_position: Any
    label: Any
    # Optional (B,) ids 0..G-1, non-decreasing: rows with one id share the whole user side
    # (sequence, user, profile, context); a scorer's candidates of one request. The model then
    # computes the user side once per group. Dropped by slice/concat.
    group: Any = None

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def to_torch(self, device: Any = "cpu", non_blocking: bool = False, pin: bool = False) -> "Batch":
        """Tensors on ``device`` (pinned host memory + non-blocking copies for CUDA)."""
        import torch

        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
                continue
            t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            out[f.name] = t.to(device, non_blocking=non_blocking)
        return Batch(**out)

    def slice(self, idx: Any) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "group"})

    @staticmethod
    def concat(batches: Sequence["Batch"]) -> "Batch":
        return Batch(**{f.name: np.concatenate([getattr(b, f.name) for b in batches])
                        for f in fields(Batch) if f.name != "group"})


def counter_features(counters: np.ndarray, present: np.ndarray, smoothing: float, prior: float) -> np.ndarray:
    """(B, 4) counts in COUNTER_KEYS order -> (B, NUM_DENSE) float32 features."""
    c = np.maximum(counters.astype(np.float64), 0.0)
    ui, uc, ii, ic = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    ur = (np.minimum(uc, ui) + smoothing * prior) / (ui + smoothing)
    ir = (np.minimum(ic, ii) + smoothing * prior) / (ii + smoothing)
    eps = 1e-3
    logit = lambda p: np.log(np.clip(p, eps, 1 - eps) / np.clip(1 - p, eps, 1 - eps))  # noqa: E731
    dense = np.stack([np.log1p(ui), np.log1p(uc), np.log1p(ii), np.log1p(ic), ur - prior, ir - prior,
                      logit(ur), logit(ir), present.astype(np.float64)], axis=1)
    dense[~present] = 0.0
    return dense.astype(np.float32)


class _Codes(dict):
    """Behaviour name -> code; unknown names count as clicks (no insertion, unlike defaultdict)."""

    def __missing__(self, key: Any) -> int:
        return 1


_BEHAVIOR_CODE = _Codes(BEHAVIOR_CODES)


class _LeftPad:
    """Places ragged rows (concatenated, oldest first, each at most T long) right-aligned in
    (B, T) arrays. The scatter index is computed once and shared by every column of a batch."""

    def __init__(self, lengths: np.ndarray, T: int):
        B, total = len(lengths), int(lengths.sum())
        self.shape = (B, T)
        offs = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        # one flat index (row * T + column): a single-array scatter is cheaper than a 2-D one
        self.index = np.repeat(np.arange(B) * T + (T - lengths), lengths) + offs

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape[0] * self.shape[1], dtype=flat.dtype)
        out[self.index] = flat
        return out.reshape(self.shape)


@dataclass
class FlatSequences:
    """A batch's behaviour sequences flattened row after row, oldest first: ``lengths`` (B,) and
    four columns of ``lengths.sum()`` entries (ids as given, behaviours as codes, times in ms).
    The trainer's columnar decoding (``trainer/sample_decode.py``) produces this form."""

    lengths: np.ndarray
    items: Any
    categories: Any
    behaviors: np.ndarray
    ts: np.ndarray

    def last(self, T: int) -> "FlatSequences":
        """Only the most recent ``T`` behaviours of each row."""
        if not len(self.lengths) or self.lengths.max(initial=0) <= T:
            return self
        ends = np.cumsum(self.lengths)
        from_end = np.repeat(ends, self.lengths) - np.arange(int(ends[-1])) - 1
        keep = from_end < T
        return FlatSequences(np.minimum(self.lengths, T), np.asarray(self.items)[keep],
                             np.asarray(self.categories)[keep], self.behaviors[keep], self.ts[keep])


def _flatten(cols: Mapping[str, Any], B: int, T: int) -> FlatSequences:
    """FlatSequences of the ragged ``hist_*`` lists, cut to the last T (before hashing)."""
    hist_items = cols.get("hist_item_ids") or [[] for _ in range(B)]
    lengths = np.fromiter((len(h) for h in hist_items), dtype=np.int64, count=B)

    def flat(name: str) -> list:
        rows = cols.get(name) or [[] for _ in range(B)]
        out: list = []
        for r, n in zip(rows, lengths):
            out.extend(r[-T:] if n > T else r)
        return out
    f_beh = flat("hist_behaviors")
    return FlatSequences(np.minimum(lengths, T), flat("hist_item_ids"), flat("hist_category_ids"),
                         np.fromiter(map(_BEHAVIOR_CODE.__getitem__, f_beh), dtype=np.int64, count=len(f_beh)),
                         np.asarray(flat("hist_ts"), dtype=np.int64))


def columns_to_batch(cols: Mapping[str, Any], settings: Any) -> Batch:
    """Batch from column arrays: ``user_id, item_id, category_id, ts`` (length B), ragged
    ``hist_item_ids, hist_category_ids, hist_behaviors, hist_ts`` (B lists, oldest first) or
    instead ``sequences`` (a :class:`FlatSequences`), and optional ``label``, ``counters``
    ((B, 4) array in COUNTER_KEYS order or B dicts/None), ``user_profile``, ``context``,
    ``item_features`` (B dicts/None), ``position`` (B ints/None).

    Scorers build one user's sequence with many candidates by repeating the user columns.
    """
    m, T = settings.model, settings.features.seq_len
    B = len(cols["item_id"])
    seq = cols["sequences"].last(T) if cols.get("sequences") is not None else _flatten(cols, B, T)
    pad = _LeftPad(seq.lengths, T)
    hist_item = pad(hash_ids(seq.items, m.item_vocab_size, "item") if len(seq.items) else np.zeros(0, np.int64))
    hist_cat = pad(hash_ids(seq.categories, m.category_vocab_size, "category") if len(seq.categories)
                   else np.zeros(0, np.int64))
    hist_beh = pad(seq.behaviors)
    mask = pad(np.ones(len(seq.behaviors), dtype=np.float32))
    # position = distance from the newest behaviour (0 = newest); padding 0 (masked anyway)
    pos = np.where(mask > 0, (T - 1) - np.arange(T)[None, :], 0).astype(np.int64)
    ts = np.asarray(cols["ts"], dtype=np.int64)
    hist_ts = pad(seq.ts)
    gap = np.where(mask > 0, time_gap_bucket(ts[:, None] - hist_ts, m.time_gap_buckets), 0)

    counters = cols.get("counters")
    if counters is None:
        cnt, present = np.zeros((B, 4)), np.zeros(B, dtype=bool)
    elif isinstance(counters, np.ndarray):
        cnt, present = counters, np.ones(B, dtype=bool)
    else:
        cnt = np.array([[c.get(k, 0.0) for k in COUNTER_KEYS] if c else (0.0,) * 4 for c in counters],
                       dtype=np.float64).reshape(B, 4)
        present = np.fromiter((bool(c) for c in counters), dtype=bool, count=B)
    label = cols.get("label")
    none = [None] * B
    shown_at = cols.get("position") or none
    display_position = np.fromiter((0 if p is None else 1 + min(int(p), POSITION_BUCKETS - 2) for p in shown_at),
                                   dtype=np.int64, count=B)
    return Batch(
        user=hash_ids(cols["user_id"], m.user_vocab_size, "user"),
        item=hash_ids(cols["item_id"], m.item_vocab_size, "item"),
        category=hash_ids(cols["category_id"], m.category_vocab_size, "category"),
        hist_item=hist_item, hist_category=hist_cat, hist_behavior=hist_beh, hist_position=pos,
        hist_gap=gap, mask=mask,
        profile=hash_field_maps(cols.get("user_profile") or none, m.max_profile_fields, m.field_vocab_size),
        context=hash_field_maps(cols.get("context") or none, m.max_context_fields, m.field_vocab_size),
        item_fields=hash_field_maps(cols.get("item_features") or none, m.max_item_fields, m.field_vocab_size),
        dense=counter_features(cnt, present, m.counter_smoothing, m.counter_prior),
        display_position=display_position,
        label=(np.zeros(B, np.float32) if label is None else np.asarray(label, dtype=np.float32)),
    )


_SAMPLE_COLUMNS = ("user_id", "item_id", "category_id", "ts", "label", "hist_item_ids", "hist_category_ids",
                   "hist_behaviors", "hist_ts", "counters", "user_profile", "context", "item_features",
                   "position")


def samples_to_batch(samples: Sequence[Any], settings: Any) -> Batch:
    """Batch from ``Sample`` contracts (or any objects with the same attributes)."""
    cols = {name: [getattr(s, name, None) for s in samples] for name in _SAMPLE_COLUMNS}
    return columns_to_batch(cols, settings)

