"""Real data -> ``Sample`` contracts, point-in-time correct.

MovieLens 100K (RecBole atomic files): every rating is an impression, rating >= 4 a click. The
sequence of an impression is the user's clicked movies with a timestamp STRICTLY earlier (76 % of
ratings share their user's timestamp with another rating: none of those may see each other), and
the counters are the user's and the item's impressions and clicks strictly earlier too. Category =
the movie's FIRST genre (one category id per behaviour, as the model's category table expects); the
full genre set and release year go into ``item_features``; age, gender, occupation into
``user_profile``.

Alimama (the DMR reference code's 267-column layout): each row becomes one Sample. The sequence
blocks carry category and brand but no item id, so (like the reference, which embeds behaviours
as [category, brand]) the brand is used as the item id of behaviours AND target; the ad group,
campaign, customer and price go into ``item_features``. Rows carry no times: ``ts`` follows the
file order and behaviours get synthetic strictly earlier times (so time-gap features are off).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import numpy as np

from dmrstream.contracts import Sample

BTAG = {1: "click", 2: "cart", 3: "fav", 4: "buy"}  # reference codes; 0 = padding (read as click)
ALIMAMA_T0_MS = 1_494_028_800_000  # 2017-05-06, the data set's first day
_PROFILE_COLS = ("cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
                 "shopping_level", "occupation", "new_user_class_level")


def _read_atomic(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.split(":")[0] for h in rows[0]]
    return header, rows[1:]


def movielens_samples(data_dir: str | Path, seq_len: int = 50, limit: int | None = None) -> list[Sample]:
    """MovieLens 100K as Samples in time order (stable on file row for equal timestamps).

    ``limit`` keeps only the first N events in time order (tests)."""
    d = Path(data_dir)
    _, inter = _read_atomic(d / "ml-100k.inter")
    _, items = _read_atomic(d / "ml-100k.item")
    _, users = _read_atomic(d / "ml-100k.user")
    genres = {r[0]: (r[3].split() if len(r) > 3 else []) for r in items}
    year = {r[0]: r[2] if len(r) > 2 else "" for r in items}
    profile = {r[0]: {"age": int(r[1]) // 10 * 10, "gender": r[2], "occupation": r[3]} for r in users}

    uid = [r[0] for r in inter]
    iid = [r[1] for r in inter]
    rating = np.array([float(r[2]) for r in inter])
    ts_s = np.array([int(float(r[3])) for r in inter], dtype=np.int64)
    order = np.argsort(ts_s, kind="stable")
    if limit is not None:
        order = order[:limit]

    hist: dict[str, list[tuple[str, str, int]]] = {}     # user -> clicked (item, category, ts_ms)
    seen_u: dict[str, list[int]] = {}                     # [impressions, clicks] strictly earlier
    seen_i: dict[str, list[int]] = {}
    pending: list[tuple[str, str, str, int, int]] = []    # same-timestamp events not yet applied
    out: list[Sample] = []
    current_ts = None
    for row in order:
        t = int(ts_s[row])
        if t != current_ts:  # apply the previous timestamp's events only once time has moved on
            _apply(pending, hist, seen_u, seen_i, seq_len)
            pending, current_ts = [], t
        u, i = uid[row], iid[row]
        g = genres.get(i) or ["unknown"]
        label = int(rating[row] >= 4)
        h = hist.get(u, [])
        su, si = seen_u.get(u, (0, 0)), seen_i.get(i, (0, 0))
        ts_ms = t * 1000
        out.append(Sample(
            sample_id=f"ml100k:{row}", event_id=f"ml100k:{row}", user_id=int(u), item_id=int(i),
            category_id=g[0], ts=ts_ms, label=label,
            hist_item_ids=[x[0] for x in h], hist_category_ids=[x[1] for x in h],
            hist_behaviors=["click"] * len(h), hist_ts=[x[2] for x in h],
            user_profile=profile.get(u), item_features={"genres": " ".join(sorted(g)), "year": year.get(i, "")},
            counters={"user_impressions": float(su[0]), "user_clicks": float(su[1]),
                      "item_impressions": float(si[0]), "item_clicks": float(si[1])}))
        pending.append((u, i, g[0], ts_ms, label))
    return out


def _apply(events, hist, seen_u, seen_i, seq_len: int) -> None:
    for u, i, cat, ts_ms, label in events:
        su = seen_u.setdefault(u, [0, 0])
        si = seen_i.setdefault(i, [0, 0])
        su[0] += 1
        si[0] += 1
        su[1] += label
        si[1] += label
        if label:
            h = hist.setdefault(u, [])
            h.append((int(i), cat, ts_ms))
            if len(h) > seq_len:
                del h[: len(h) - seq_len]


def alimama_samples(path: str | Path) -> Iterator[Sample]:
    """Samples from the reference code's 267-integer rows (see the module docstring)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            raw = line.split(",")
            if len(raw) != 267:
                raise ValueError(f"{path}:{n + 1}: {len(raw)} columns, expected 267")
            # all integers but column 264 (the price, a float in the reference files)
            c = [int(x) if j != 264 else 0 for j, x in enumerate(raw)]
            price = float(raw[264])
            ts = ALIMAMA_T0_MS + n * 1000
            btag, cate, brand, mask = c[0:50], c[50:100], c[100:150], c[150:200]
            real = [j for j in range(50) if mask[j] == 1]  # index 49 is the most recent
            yield Sample(
                sample_id=f"alimama:{n}", event_id=f"alimama:{n}", user_id=c[250], item_id=c[263],
                category_id=c[260], ts=ts, label=1 if c[266] else 0,
                hist_item_ids=[brand[j] for j in real], hist_category_ids=[cate[j] for j in real],
                hist_behaviors=[BTAG.get(btag[j], "click") for j in real],
                hist_ts=[ts - (50 - j) for j in real],
                user_profile=dict(zip(_PROFILE_COLS, c[251:259])),
                item_features={"adgroup_id": c[259], "campaign_id": c[261], "customer": c[262], "price": round(price, 3)},
                context={"pid": c[265]})
