"""The Alimama display-ads raw files ("Ad Display/Click Data on Taobao.com"), public layouts:

- ``raw_sample.csv``: ``user,time_stamp,adgroup_id,pid,nonclk,clk``: each row an :class:`Impression`
  of the ad group (``context.pid`` the slot), ``clk=1`` also a :class:`Click` with the same ts and
  ``request_id``;
- ``behavior_log.csv``: ``user,time_stamp,btag,cate,brand`` (btag pv/cart/fav/buy): behaviours with
  no item id. They become :class:`Click` events on ``item_id = "brand:<brand>"`` (the DMR reference
  code builds sequences of brands and categories). The prefix keeps a brand id from ever equalling
  an ad-group id, which would let the join mistake a behaviour for the click of an impression;
- ``ad_feature.csv``: ``adgroup_id,cate_id,campaign_id,customer,brand,price``: the impression's
  ``category_id`` (``"unknown"`` if absent) and ``item_features`` (brand, campaign_id, customer, price);
- ``user_profile.csv``: ``userid,cms_segid,...,new_user_class_level``: ``user_profile``.
Times are unix seconds. Event ids ``"{file}:{line}:i"``/``":c"``/``":<behavior>"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dmrstream.contracts import Click, Impression
from dmrstream.settings import LimitSettings
from replay.records import BadRow, BadRows, Record, parse_id, parse_ts, scalar

_BTAG = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "buy"}


def _header(fh) -> dict[str, int]:
    return {h.strip().lower(): i for i, h in enumerate(fh.readline().rstrip("\r\n").split(","))}


def _need(col: dict[str, int], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in col]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")


def load_ad_features(path: Path) -> dict[object, tuple[object, dict]]:
    """adgroup_id -> (cate_id, item_features)."""
    out: dict[object, tuple[object, dict]] = {}
    if not path.is_file():
        return out
    lim = LimitSettings()
    with open(path, encoding="utf-8", errors="replace") as fh:
        col = _header(fh)
        _need(col, ("adgroup_id", "cate_id"), path)
        extra = [c for c in ("campaign_id", "customer", "brand", "price") if c in col]
        for line in fh:
            parts = line.rstrip("\r\n").split(",")
            try:
                ad = parse_id(parts[col["adgroup_id"]], "adgroup_id", lim)
                cate = parse_id(parts[col["cate_id"]], "cate_id", lim)
            except (BadRow, IndexError):
                continue
            feats = {}
            for c in extra:
                v = parts[col[c]] if col[c] < len(parts) else ""
                if v and v != "NULL":
                    try:
                        feats[c] = float(v) if c == "price" else scalar(v)
                    except ValueError:
                        pass
            out[ad] = (cate, feats)
    return out


def load_user_profiles(path: Path) -> dict[object, dict]:
    """userid -> user_profile (every column but the id; empty values left out)."""
    out: dict[object, dict] = {}
    if not path.is_file():
        return out
    lim = LimitSettings()
    with open(path, encoding="utf-8", errors="replace") as fh:
        col = _header(fh)
        _need(col, ("userid",), path)
        fields = [(c, i) for c, i in col.items() if c != "userid"]
        for line in fh:
            parts = line.rstrip("\r\n").split(",")
            try:
                user = parse_id(parts[col["userid"]], "userid", lim)
            except (BadRow, IndexError):
                continue
            prof = {c: v for c, i in fields if i < len(parts) and (v := scalar(parts[i])) is not None}
            out[user] = prof
    return out


def read_raw_sample(path: Path, source: int, bad: BadRows,
                limits: LimitSettings, tag: str | None = None) -> Iterator[Record]:
    """Impressions (and clicks) of ``raw_sample.csv`` in file order."""
    ads = load_ad_features(path.with_name("ad_feature.csv"))
    users = load_user_profiles(path.with_name("user_profile.csv"))
    tag = tag or path.name
    with open(path, encoding="utf-8", errors="replace") as fh:
        col = _header(fh)
        _need(col, ("user", "time_stamp", "adgroup_id", "clk"), path)
        cu, ct, ca, cc, cp = col["user"], col["time_stamp"], col["adgroup_id"], col["clk"], col.get("pid")
        width = len(col)
        for line_no, line in enumerate(fh, 2):
            parts = line.rstrip("\r\n").split(",")
            try:
                if len(parts) != width:
                    raise BadRow(f"expected {width} comma-separated fields, got {len(parts)}")
                user = parse_id(parts[cu], "user", limits)
                ad = parse_id(parts[ca], "adgroup_id", limits)
                ts = parse_ts(parts[ct], "s", limits)
                clk = parts[cc].strip()
                if clk not in ("0", "1"):
                    raise BadRow(f"clk must be 0 or 1, got {clk[:10]!r}")
            except BadRow as e:
                if line.strip():
                    bad.add(tag, line_no, str(e))
                continue
            cate, feats = ads.get(ad, ("unknown", None))
            rid = f"{tag}:{line_no}"
            pid = parts[cp].strip() if cp is not None else ""
            imp = Impression(event_id=rid + ":i", user_id=user, item_id=ad, category_id=cate, ts=ts, request_id=rid,
                             context={"pid": pid[:256]} if pid else None, user_profile=users.get(user),
                             item_features=feats or None)
            if clk == "1":
                click = Click(event_id=rid + ":c", user_id=user, item_id=ad, category_id=cate, ts=ts, request_id=rid)
                yield Record(ts, source, line_no, (imp, click))
            else:
                yield Record(ts, source, line_no, (imp,))


def read_behavior_log(path: Path, source: int, bad: BadRows,
                limits: LimitSettings, tag: str | None = None) -> Iterator[Record]:
    """Behaviours of ``behavior_log.csv`` in file order, as clicks on ``"brand:<id>"`` items."""
    tag = tag or path.name
    with open(path, encoding="utf-8", errors="replace") as fh:
        col = _header(fh)
        _need(col, ("user", "time_stamp", "btag", "cate", "brand"), path)
        cu, ct, cb, cc, cr = col["user"], col["time_stamp"], col["btag"], col["cate"], col["brand"]
        width = len(col)
        for line_no, line in enumerate(fh, 2):
            parts = line.rstrip("\r\n").split(",")
            try:
                if len(parts) != width:
                    raise BadRow(f"expected {width} comma-separated fields, got {len(parts)}")
                behavior = _BTAG.get(parts[cb].strip())
                if behavior is None:
                    raise BadRow(f"unknown btag {parts[cb][:20]!r} (pv/cart/fav/buy)")
                user = parse_id(parts[cu], "user", limits)
                cate = parse_id(parts[cc], "cate", limits)
                brand = parts[cr].strip()
                if not brand or brand == "NULL":
                    brand = "unknown"
                item = parse_id(f"brand:{brand}", "brand", limits)
                ts = parse_ts(parts[ct], "s", limits)
            except BadRow as e:
                if line.strip():
                    bad.add(tag, line_no, str(e))
                continue
            yield Record(ts, source, line_no, (Click(event_id=f"{tag}:{line_no}:{behavior}", user_id=user,
                                                     item_id=item, category_id=cate, ts=ts, behavior=behavior),))
