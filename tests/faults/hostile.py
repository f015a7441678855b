"""Hostile message generator for the fault tests (pure, deterministic by seed; no Kafka here).

:func:`hostile` gives ``n`` bad messages for one input contract (impressions, clicks, samples,
score requests), cycling through every kind of damage a producer, a broken client or an attacker
can put on a topic: malformed JSON, wrong types, oversized payloads (a few of ~10 MB, more just
over the contract limit), deep nesting, NaN/inf, negative or huge ids, invalid UTF-8, timestamps
far in the past or future, unknown schema versions, empty/null values, unknown fields and
contract-specific violations (a label of 2, an empty candidate list...). Each :class:`Bad` names
its kind and the reason prefixes the strict decoder may give it; the tests check both that the
decoder refuses every one and that the running component dead-letters every one exactly once.

The good events (:func:`good_impressions_and_clicks`, :func:`good_samples`,
:func:`good_requests`) and :func:`interleave` (bad ones spread between good ones, duplicates of
good ones re-sent) are here too, so one seed reproduces a whole run.
"""

from __future__ import annotations

import json
import random
import base64
from dataclasses import dataclass
from typing import Any, Callable

from dmrstream.contracts import Candidate, Click, Impression, ScoreRequest, encode

T0 = 1_700_000_000_000
BIG = 10 * 1024 * 1024  # "~10 MB": the local broker (tansu) accepts it; the contract limit is 1 MB
HUGE_KEY = 2 * 1024 * 1024  # a Kafka key over the producers' default 1 MB request limit
BIG_COUNT = 2  # per topic (they cost broker memory and transfer time; the just-over ones are many)

KINDS = ("malformed_json", "wrong_types", "oversize", "deep_nesting", "nan_inf", "bad_ids", "invalid_utf8",
         "bad_ts", "unknown_schema", "empty", "unknown_field", "contract")


@dataclass(frozen=True)
class Bad:
    """One hostile message: its kind, the bytes (None: a tombstone) and the reason prefixes the
    decoder may give (``"invalid"`` for ``"invalid: ..."``)."""

    kind: str
    value: bytes | None
    reasons: tuple[str, ...]
    key: bytes = b"hostile"


# -- good templates per contract (plain dicts, mutated into bad ones) ---------------------------
def _impression(i: int) -> dict[str, Any]:
    return {"schema": 1, "event_id": f"bad-i{i}", "user_id": i % 40, "item_id": 7, "category_id": 1,
            "ts": T0 + i, "request_id": f"bad-r{i}", "position": 2, "context": {"page": "home"},
            "item_features": {"price": 9.5, "brand": "b"}}


def _click(i: int) -> dict[str, Any]:
    return {"schema": 1, "event_id": f"bad-c{i}", "user_id": i % 40, "item_id": 7, "category_id": 1,
            "ts": T0 + i, "behavior": "click", "request_id": f"bad-r{i}"}


def _sample(i: int) -> dict[str, Any]:
    return {"schema": 1, "sample_id": f"bad-s{i}", "event_id": f"bad-s{i}", "user_id": i % 40, "item_id": 7,
            "category_id": 1, "ts": T0 + i, "label": 1, "hist_item_ids": [1, 2], "hist_category_ids": [1, 1],
            "hist_behaviors": ["click", "click"], "hist_ts": [T0 - 10, T0 - 5],
            "counters": {"user_impressions": 3.0, "user_clicks": 1.0}}


def _request(i: int) -> dict[str, Any]:
    return {"schema": 1, "request_id": f"bad-q{i}", "user_id": i % 40, "ts": T0 + i,
            "candidates": [{"item_id": 7, "category_id": 1}, {"item_id": 8, "category_id": 2}]}


def _update(i: int) -> dict[str, Any]:
    return {"schema": 1, "version": 2 + i, "kind": "delta", "base_version": 1 + i,
            "uri": f"v{2 + i:08d}.delta.safetensors", "sha256": "ab" * 32, "created_at": T0 + i,
            "trained_until_ts": T0 + i, "samples_seen": 10 * i, "metrics": {"auc_window": 0.7}}


TEMPLATES: dict[str, Callable[[int], dict[str, Any]]] = {
    "impressions": _impression, "clicks": _click, "samples": _sample, "score_requests": _request,
    "model_updates": _update}
ID_FIELDS = {"impressions": ("user_id", "item_id", "category_id", "event_id"),
             "clicks": ("user_id", "item_id", "category_id", "event_id"),
             "samples": ("user_id", "item_id", "category_id", "sample_id"),
             "score_requests": ("user_id", "request_id"),
             "model_updates": ("version", "uri")}
FLOAT_PATHS = {"impressions": (("item_features", "price"), ("context", "score"), ("true_ctr",)),
               "clicks": (("ts",), ("user_id",)),
               "samples": (("counters", "user_clicks"), ("served_score",), ("true_ctr",)),
               "score_requests": (("context", "x"), ("ts",)),
               "model_updates": (("metrics", "auc_window"), ("created_at",))}


def _dumps(d: Any) -> bytes:
    return json.dumps(d, separators=(",", ":"), allow_nan=True).encode()


def _set(d: dict, path: tuple[str, ...], value: Any) -> dict:
    node = d
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    return d


def _junk(rng: random.Random, n: int) -> str:
    """Incompressible printable text (a 10 MB payload must really be 10 MB on the wire)."""
    return base64.b64encode(rng.randbytes(n * 3 // 4 + 3)).decode()[:n]


def _variants(topic: str, i: int, rng: random.Random, big_left: list[int],
              oversize: bool) -> list[tuple[str, bytes | None, tuple]]:
    """Candidate bad messages for index ``i`` (one is picked per kind in turn); the costly
    oversize one only when ``oversize``."""
    t = TEMPLATES[topic]
    g = t(i)
    good = _dumps(g)
    out: list[tuple[str, bytes | None, tuple]] = []
    # malformed JSON
    cut = rng.randrange(1, len(good) - 1)
    out.append(("malformed_json", rng.choice([
        good[:cut], good + b"}", good.replace(b":", b"=", 1), b"not json at all", b"{'schema': 1}",
        good.replace(b",", b",,", 1), b"{" * 3, b"\x00\x01\x02binary", good[:-1] + b",}"]), ("malformed",)))
    # wrong types
    field = rng.choice(list(g))
    if field == "schema":
        wrong = [1]
    elif field == "ts":
        wrong = rng.choice([[1], {"a": 1}, "2024-01-01", True])
    elif isinstance(g[field], dict):  # a field map: any scalar map would be valid
        wrong = rng.choice([[1, 2], 1.5, "s", True])
    elif isinstance(g[field], list):  # a list of ids: [1, 2] would be valid
        wrong = rng.choice([{"a": 1}, 1.5, "s", [[1]], [None]])
    else:
        wrong = rng.choice([[1, 2], {"a": 1}, 1.5])
    bad_t = dict(g)
    bad_t[field] = wrong
    out.append(("wrong_types", rng.choice([_dumps(bad_t), b"[1,2,3]", b"42", b'"a string"', b"true"]), ("invalid",)))
    # oversize: ~10 MB for the first few, else just over the 1 MB contract limit
    if oversize:
        if big_left[0] > 0:
            big_left[0] -= 1
            size = BIG
        else:
            size = 1_000_000 + rng.randrange(1, 30_000)
        field_name = "context" if topic != "clicks" else "junk"
        pad = {**g, field_name: {"pad": ""}}
        base = len(_dumps(pad))
        pad[field_name]["pad"] = _junk(rng, size - base)
        out.append(("oversize", _dumps(pad), ("size",)))
    # deep nesting (an array/object 50k deep: a recursive parser would blow its stack)
    depth = rng.choice([1000, 20_000, 50_000])
    nested = rng.choice([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
                         good[:-1] + b',"context":' + b"[" * depth + b"]" * depth + b"}",
                         b"[" * depth])
    out.append(("deep_nesting", nested, ("invalid", "malformed")))
    # NaN / inf: JSON has neither (literals refused), 1e999 overflows to inf
    path = rng.choice(FLOAT_PATHS[topic])
    lit = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"nan"])
    marker = _dumps(_set(json.loads(good), path, "@@X@@"))
    out.append(("nan_inf", marker.replace(b'"@@X@@"', lit), ("invalid", "malformed")))
    # negative / huge / overlong / empty ids
    idf = rng.choice(ID_FIELDS[topic])
    if idf in ("event_id", "sample_id", "request_id"):
        val = rng.choice(["", "x" * 600, "y" * 200, 5, None])
    elif idf == "uri":  # up to 4,096 characters is a valid URI string
        val = rng.choice(["", "x" * 5000, 5, None])
    else:
        val = rng.choice([-1, -(2 ** 63), 2 ** 63, 2 ** 64, 10 ** 30, "", "z" * 200, "w" * 100_000, 1.0e20])
    out.append(("bad_ids", _dumps({**g, idf: val}), ("invalid", "limit")))
    # invalid UTF-8 inside a string value
    seq = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xfe\xfe\xff", b"\x80"])
    s_field = "event_id" if "event_id" in g else ID_FIELDS[topic][-1]
    raw = good.replace(f'"{g[s_field]}"'.encode(), b'"' + g[s_field].encode() + seq + b'"', 1)
    out.append(("invalid_utf8", raw, ("utf8",)))
    # far past / future timestamps (and seconds sent as milliseconds)
    ts = rng.choice([0, 1, 1_700_000_000, 631_151_999_999, 4_102_444_800_001, 10 ** 15, 2 ** 53, 2 ** 53 + 1,
                     -1, 2 ** 70, T0 + 0.5])
    out.append(("bad_ts", _dumps({**g, "ts": ts}), ("invalid", "limit")))
    # unknown schema versions
    out.append(("unknown_schema", _dumps({**g, "schema": rng.choice([0, 2, 99, -1, "1", None, 1.5, 10 ** 9])}),
                ("invalid",)))
    # empty / null
    out.append(("empty", rng.choice([None, b"", b"{}", b"null", b"   ", b'""', b"[]",
                                    _dumps({k: None for k in g})]), ("empty", "invalid", "malformed")))
    # unknown field
    out.append(("unknown_field", _dumps({**g, rng.choice(["__proto__", "admin", "x" * 70, "evil"]): 1}),
                ("invalid",)))
    # contract-specific violations of otherwise well-formed events
    c = dict(g)
    if topic == "impressions":
        c = rng.choice([{**g, "position": -1}, {**g, "position": 10_001}, {**g, "true_ctr": 1.5},
                        {**g, "context": {f"f{k}": k for k in range(65)}}, {**g, "sampled": "yes"},
                        {**g, "context": {"": 1}}, {**g, "context": {"k": [1, 2]}}])
        reasons: tuple = ("invalid", "limit")
    elif topic == "clicks":
        c = rng.choice([{**g, "behavior": "like"}, {**g, "behavior": ""}, {**g, "behavior": "CLICK"},
                        {**g, "request_id": ""}])
        reasons = ("invalid",)
    elif topic == "samples":
        c = rng.choice([{**g, "label": 2}, {**g, "label": -1}, {**g, "label": 0.5},
                        {**g, "hist_ts": [T0 - 10]},  # columns differ in length
                        {**g, "hist_ts": [T0 - 10, g["ts"]]},  # a behaviour not strictly before
                        {**g, "hist_behaviors": ["click", "view"]},
                        {**g, "hist_item_ids": list(range(1001)), "hist_category_ids": [1] * 1001,
                         "hist_behaviors": ["click"] * 1001, "hist_ts": [T0 - 2000 + k for k in range(1001)]},
                        {**g, "counters": {"user_clicks": 1e31}}, {**g, "served_score": -0.1}])
        reasons = ("invalid", "limit")
    elif topic == "model_updates":
        c = rng.choice([{**g, "kind": "partial"}, {**g, "sha256": "xyz"}, {**g, "sha256": "AB" * 32},
                        {**g, "uri": ""}, {**g, "uri": "u" * 5000}, {**g, "version": 0},
                        {**g, "metrics": {"auc": "high"}}, {**g, "samples_seen": -5}])
        reasons = ("invalid", "limit")
    else:
        c = rng.choice([{**g, "candidates": []}, {**g, "candidates": [{"item_id": 1}]},
                        {**g, "candidates": [{"item_id": k, "category_id": 1} for k in range(1001)]},
                        {**g, "candidates": [{"item_id": -3, "category_id": 1}]},
                        {**g, "candidates": [{"item_id": 1, "category_id": 1, "x": 1}]},
                        {**g, "candidates": {"item_id": 1, "category_id": 1}},
                        {**g, "candidates": [{"item_id": "q" * 300, "category_id": 1}]}])
        reasons = ("invalid", "limit")
    out.append(("contract", _dumps(c), reasons))
    return out


def hostile(topic: str, n: int = 1000, seed: int = 0, big: int = BIG_COUNT, oversize: int = 10,
            huge_keys: int = 2) -> list[Bad]:
    """``n`` bad messages for ``topic`` (impressions | clicks | samples | score_requests |
    model_updates), every
    kind in turn; ``oversize`` of them over the size limit, the first ``big`` of those ~10 MB
    (the rest just over 1 MB: they cost broker memory and transfer, so they are few). The first
    ``huge_keys`` carry a 2 MB Kafka key (over a producer's default request limit)."""
    rng = random.Random(f"{seed}/{topic}")
    big_left, over_left = [big], oversize
    out: list[Bad] = []
    i = 0
    while len(out) < n:
        kinds = [k for k in KINDS if k != "oversize" or over_left > 0]
        want = kinds[i % len(kinds)]
        for kind, value, reasons in _variants(topic, i, rng, big_left, want == "oversize"):
            if kind == want:
                key = str(i % 40).encode() + (b"K" * HUGE_KEY if len(out) < huge_keys else b"")
                out.append(Bad(kind, value, reasons, key=key))
                over_left -= kind == "oversize"
                break
        i += 1
    return out


# -- good events ------------------------------------------------------------------------------
def good_impressions_and_clicks(n_impressions: int, seed: int = 11, users: int = 40, items: int = 120,
                                click_rate: float = 0.35) -> list[Impression | Click]:
    """A small stream in event-time order: clicks 0.5-5 s after their impression, matched by
    request id (so the label of every impression is known: 1 iff it has a click)."""
    rng = random.Random(seed)
    events: list[Impression | Click] = []
    for k in range(n_impressions):
        user = rng.randrange(users)
        item = rng.randrange(items)
        ts = T0 + k * 250 + rng.randrange(100)
        events.append(Impression(event_id=f"i{k}", user_id=user, item_id=item, category_id=item % 9, ts=ts,
                                 request_id=f"r{k}", position=k % 10))
        if rng.random() < click_rate:
            events.append(Click(event_id=f"c{k}", user_id=user, item_id=item, category_id=item % 9,
                                ts=ts + rng.randrange(500, 5_000), request_id=f"r{k}"))
    return sorted(events, key=lambda e: e.ts)


def good_requests(n: int, seed: int = 5) -> list[ScoreRequest]:
    rng = random.Random(seed)
    return [ScoreRequest(request_id=f"q{k}", user_id=rng.randrange(50), ts=T0 + 10_000_000 + k,
                         candidates=[Candidate(item_id=rng.randrange(500), category_id=rng.randrange(20))
                                     for _ in range(1 + k % 12)])
            for k in range(n)]


@dataclass(frozen=True)
class Msg:
    """One message to produce: good (``event`` set; ``dup`` when it repeats an earlier one) or bad."""

    key: bytes | None
    value: bytes | None
    event: Any = None
    bad: Bad | None = None
    dup: bool = False


def interleave(good: list, bad: list[Bad], key_of: Callable[[Any], bytes], seed: int = 0,
               dup_every: int = 10) -> list[Msg]:
    """Good events in their order with the bad ones spread at random positions between them; every
    ``dup_every``-th good event is sent again (same bytes) a few messages later."""
    rng = random.Random(seed)
    slots: list[list[Bad]] = [[] for _ in range(len(good) + 1)]
    for b in bad:
        slots[rng.randrange(len(slots))].append(b)
    out: list[Msg] = []
    waiting: list[tuple[int, Msg]] = []
    for k, ev in enumerate(good):
        out += [Msg(b.key, b.value, bad=b) for b in slots[k]]
        m = Msg(key_of(ev), encode(ev), event=ev)
        out.append(m)
        if dup_every and k % dup_every == 0:
            waiting.append((k + rng.randrange(0, 4), Msg(m.key, m.value, event=ev, dup=True)))
        out += [d for at, d in waiting if at <= k]
        waiting = [(at, d) for at, d in waiting if at > k]
    out += [d for _, d in waiting]
    out += [Msg(b.key, b.value, bad=b) for b in slots[-1]]
    return out
