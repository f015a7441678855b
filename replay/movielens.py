"""MovieLens ratings as impressions and clicks.

Layouts read as a user who downloaded them has them:
- RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``; tab-separated, a
  ``name:type`` header line);
- GroupLens originals (``u.data`` tab-separated without header, ``u.item``/``u.user`` pipe-separated,
  latin-1).

Conversion (the usual one, shared with the trainer's importer):
- every rating is an :class:`Impression` of the movie to the user at the rating's time;
- a rating >= ``click_threshold`` (default 4) is also a :class:`Click` with the SAME ts, sent right
  after its impression, with the same ``request_id`` (``"{tag}:{line}"``) so the join matches it
  exactly;
- **category_id is the movie's FIRST listed genre, as its name** (e.g. ``"Animation"`` for
  "Animation Children's Comedy"; GroupLens flags are read in u.genre order, which is the order
  RecBole lists them in); a movie with no genre gets ``"unknown"``;
- ``item_features``: ``genres`` (the genre names sorted and space-separated, ``"unknown"`` if
  none) and ``year`` (release year as text, ``""`` when unknown); ``user_profile``: ``age`` (the
  decade: 24 -> 20), ``gender``, ``occupation``. These are exactly the values of the trainer's
  offline importer (``trainer/importers.py``), so online and offline features agree.
Event ids are ``"{tag}:{line}:i"`` / ``":c"`` with ``tag`` the ratings file name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from dmrstream.contracts import Click, Impression
from dmrstream.settings import LimitSettings
from replay.records import BadRow, BadRows, Record, parse_id

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")


def find_ratings(path: Path) -> Path | None:
    """The ratings file of a MovieLens directory (or the file itself), else None."""
    if path.is_file():
        return path if path.name == "u.data" or path.suffix == ".inter" else None
    for cand in sorted(path.glob("*.inter")) + [path / "u.data"]:
        if cand.is_file():
            return cand
    return None


def load_items(ratings: Path) -> dict[object, tuple[str, dict]]:
    """item id -> (category, item_features) from the item file beside the ratings, if any."""
    out: dict[object, tuple[str, dict]] = {}
    lim = LimitSettings()
    if ratings.suffix == ".inter":
        f = ratings.with_suffix(".item")
        if not f.is_file():
            return out
        with open(f, encoding="utf-8", errors="replace") as fh:
            header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]
            col = {h: i for i, h in enumerate(header)}
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                try:
                    item = parse_id(parts[col["item_id"]], "item_id", lim)
                except (BadRow, IndexError, KeyError):
                    continue
                genres = parts[col["class"]].split() if "class" in col and len(parts) > col["class"] else []
                year = parts[col["release_year"]] if "release_year" in col and len(parts) > col["release_year"] else ""
                out[item] = _item(genres, year)
    else:
        f = ratings.with_name("u.item")
        if not f.is_file():
            return out
        with open(f, encoding="latin-1") as fh:
            for line in fh:
                parts = line.rstrip("\n").split("|")
                if len(parts) < 5 + len(GENRES):
                    continue
                try:
                    item = parse_id(parts[0], "item_id", lim)
                except BadRow:
                    continue
                flags = parts[5:5 + len(GENRES)]
                genres = [g for g, flag in zip(GENRES, flags) if flag.strip() == "1"]
                m = re.search(r"(\d{4})\s*$", parts[2])
                out[item] = _item(genres, m.group(1) if m else "")
    return out


def _item(genres: list[str], year: str) -> tuple[str, dict]:
    genres = genres or ["unknown"]
    return genres[0], {"genres": " ".join(sorted(genres))[:256], "year": year.strip()[:256]}


def load_users(ratings: Path) -> dict[object, dict]:
    """user id -> user_profile (age, gender, occupation) from the user file beside the ratings."""
    out: dict[object, dict] = {}
    lim = LimitSettings()
    if ratings.suffix == ".inter":
        f, sep, enc = ratings.with_suffix(".user"), "\t", "utf-8"
    else:
        f, sep, enc = ratings.with_name("u.user"), "|", "latin-1"
    if not f.is_file():
        return out
    with open(f, encoding=enc, errors="replace") as fh:
        if sep == "\t":
            header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]
        else:
            header = ["user_id", "age", "gender", "occupation", "zip_code"]
        for line in fh:
            row = dict(zip(header, line.rstrip("\n").split(sep)))
            try:
                user = parse_id(row.get("user_id"), "user_id", lim)
            except BadRow:
                continue
            prof: dict = {}
            if row.get("age", "").strip().isdigit():
                prof["age"] = int(row["age"]) // 10 * 10
            for k in ("gender", "occupation"):
                if row.get(k, "").strip():
                    prof[k] = row[k].strip()[:256]
            out[user] = prof
    return out


def read_movielens(path: Path, source: int, bad: BadRows, limits: LimitSettings, tag: str | None = None,
                   click_threshold: float = 4.0) -> Iterator[Record]:
    """Records of a MovieLens ratings file in file order (the caller sorts by time)."""
    ratings = find_ratings(path)
    if ratings is None:
        raise FileNotFoundError(f"no MovieLens ratings (*.inter or u.data) at {path}")
    items, users = load_items(ratings), load_users(ratings)
    tag = tag or ratings.name
    recbole = ratings.suffix == ".inter"
    with open(ratings, encoding="utf-8", errors="replace") as fh:
        col = {"user_id": 0, "item_id": 1, "rating": 2, "timestamp": 3}
        start = 1
        if recbole:
            header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]
            col = {h: i for i, h in enumerate(header)}
            start = 2
            if not {"user_id", "item_id", "rating", "timestamp"} <= col.keys():
                raise ValueError(f"{ratings}: header lacks user_id/item_id/rating/timestamp: {header}")
        cu, ci, cr, ct = col["user_id"], col["item_id"], col["rating"], col["timestamp"]
        for line_no, line in enumerate(fh, start):
            parts = line.rstrip("\r\n").split("\t")
            try:
                if len(parts) <= max(cu, ci, cr, ct):
                    raise BadRow(f"expected 4 tab-separated fields, got {len(parts)}")
                user = parse_id(parts[cu], "user_id", limits)
                item = parse_id(parts[ci], "item_id", limits)
                try:
                    rating = float(parts[cr])
                    seconds = float(parts[ct])
                except ValueError:
                    raise BadRow(f"rating/timestamp not numeric: {parts[cr][:20]!r}, {parts[ct][:20]!r}") from None
                ts = int(seconds * 1000)
                if not limits.min_ts_ms <= ts <= limits.max_ts_ms:
                    raise BadRow(f"ts: {ts} ms outside 1990..2100")
            except BadRow as e:
                if line.strip():
                    bad.add(tag, line_no, str(e))
                continue
            category, features = items.get(item, ("unknown", None))
            rid = f"{tag}:{line_no}"
            imp = Impression(event_id=rid + ":i", user_id=user, item_id=item, category_id=category, ts=ts,
                             request_id=rid, user_profile=users.get(user), item_features=features)
            if rating >= click_threshold:
                click = Click(event_id=rid + ":c", user_id=user, item_id=item, category_id=category, ts=ts,
                              request_id=rid)
                yield Record(ts, source, line_no, (imp, click))
            else:
                yield Record(ts, source, line_no, (imp,))
