"""Event contracts: round trips, and hostile input rejected with a reason (never another error)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from dmrstream.contracts import (
    Candidate, Click, Codec, ContractError, Impression, ItemScore, ModelUpdate, Sample, Score, ScoreRequest,
    decode_dead_letter, dead_letter, encode,
)
from dmrstream.settings import LimitSettings

TS = 1_700_000_000_000


def valid_events() -> dict[type, object]:
    return {
        Impression: Impression(event_id="imp-1", user_id=42, item_id="item-9", category_id=3, ts=TS,
                               request_id="r1", position=2, context={"page": "home"},
                               user_profile={"age": 30}, item_features={"price": 9.5}, true_ctr=0.1),
        Click: Click(event_id="clk-1", user_id="u42", item_id=9, category_id="c3", ts=TS + 1000, behavior="cart"),
        ScoreRequest: ScoreRequest(request_id="r1", user_id=42, ts=TS,
                                   candidates=[Candidate(item_id=i, category_id=i % 3) for i in range(5)]),
        Score: Score(request_id="r1", user_id=42, model_version=3, ts=TS, latency_ms=1.5,
                     scores=[ItemScore(item_id=1, score=0.25)]),
        Sample: Sample(sample_id="s1", event_id="imp-1", user_id=42, item_id=9, category_id=3, ts=TS, label=1,
                       hist_item_ids=[1, "x"], hist_category_ids=[1, 2], hist_behaviors=["click", "buy"],
                       hist_ts=[TS - 2, TS - 1], counters={"user_clicks": 3.0}, served_score=0.4, served_version=2),
        ModelUpdate: ModelUpdate(version=5, kind="delta", base_version=4, uri="models/v5.safetensors",
                                 sha256="a" * 64, created_at=TS, trained_until_ts=TS, samples_seen=1000,
                                 metrics={"auc": 0.7}),
    }


CONTRACTS = list(valid_events())


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_round_trip(contract):
    event = valid_events()[contract]
    raw = encode(event)
    assert json.loads(raw)["schema"] == 1
    assert Codec(contract).decode(raw) == event


def test_schema_field_defaults_to_1_and_unknown_versions_are_rejected():
    raw = json.loads(encode(valid_events()[Click]))
    del raw["schema"]
    assert Codec(Click).decode(json.dumps(raw).encode()).schema == 1
    raw["schema"] = 2
    with pytest.raises(ContractError, match="schema"):
        Codec(Click).decode(json.dumps(raw).encode())


# --- hostile input ---------------------------------------------------------------------------
REQUIRED = {
    Impression: ["event_id", "user_id", "item_id", "category_id", "ts"],
    Click: ["event_id", "user_id", "item_id", "category_id", "ts"],
    ScoreRequest: ["request_id", "user_id", "candidates", "ts"],
    Score: ["request_id", "user_id", "model_version", "scores", "ts", "latency_ms"],
    Sample: ["sample_id", "event_id", "user_id", "item_id", "category_id", "ts", "label"],
    ModelUpdate: ["version", "kind", "uri", "sha256", "created_at", "trained_until_ts", "samples_seen"],
}
TS_FIELDS = {ModelUpdate: "created_at"}
WRONG_TYPES = [None, True, 1.5, [], {}, [1, 2], {"a": {"b": []}}]
BAD_TS = [-1, 0, 1_700_000_000, 10**20, 2**64, 9_999_999_999_999_999, "1700000000000", 1.7e12]


def _deep(n: int) -> object:
    x: object = []
    for _ in range(n):
        x = [x]
    return x


def hostile(contract: type, rng: random.Random) -> tuple[str, bytes]:
    """One invalid message for ``contract`` and the kind of damage done."""
    base = json.loads(encode(valid_events()[contract]))
    field = rng.choice(REQUIRED[contract])
    kind = rng.choice(["missing", "wrong_type", "huge_string", "huge_list", "nan_inf", "bad_utf8", "bad_ts",
                       "nested_junk", "not_object", "truncated", "schema", "negative_id", "oversized"])
    d = dict(base)
    if kind == "missing":
        del d[field]
    elif kind == "wrong_type":
        d[field] = rng.choice([w for w in WRONG_TYPES if not isinstance(w, type(base[field]))])
    elif kind == "huge_string":
        d[field] = "x" * rng.choice([5_000, 200_000])
        if field in ("candidates", "scores") or isinstance(base[field], (int, float)) and field not in (
                "user_id", "item_id", "category_id"):
            pass  # a string where a number/list belongs: also invalid
    elif kind == "huge_list":
        d[field] = list(range(rng.choice([1_001, 20_000])))
        if contract is ScoreRequest:
            d["candidates"] = [{"item_id": i, "category_id": 1} for i in range(1_001 + rng.randrange(500))]
        elif contract is Score:
            d["scores"] = [{"item_id": i, "score": 0.5} for i in range(1_001 + rng.randrange(500))]
    elif kind == "nan_inf":
        token = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
        target = {Score: "latency_ms", Sample: "served_score", ModelUpdate: "metrics"}.get(contract, "ts")
        raw = json.dumps(d).replace(f'"{target}": ', f'"{target}": {token}, "_": ', 1) if target in d else None
        if contract is ModelUpdate:
            d["metrics"] = {"auc": "PLACEHOLDER"}
            raw = json.dumps(d).replace('"PLACEHOLDER"', token)
        elif contract is Impression:
            d["true_ctr"] = "PLACEHOLDER"
            raw = json.dumps(d).replace('"PLACEHOLDER"', token)
        elif raw is None or target not in d:
            d[field] = "PLACEHOLDER"
            raw = json.dumps(d).replace('"PLACEHOLDER"', token)
        else:
            d[target] = "PLACEHOLDER"
            raw = json.dumps(d).replace('"PLACEHOLDER"', token)
        return kind, raw.encode()
    elif kind == "bad_utf8":
        raw = json.dumps(d).encode()
        cut = raw.index(b'"', 2)
        return kind, raw[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + raw[cut:]
    elif kind == "bad_ts":
        d[TS_FIELDS.get(contract, "ts")] = rng.choice(BAD_TS)
    elif kind == "nested_junk":
        d[rng.choice(["junk", "extra", "__proto__"])] = _deep(rng.choice([5, 50, 500]))
    elif kind == "not_object":
        return kind, json.dumps(rng.choice([[d], 1, "event", None, [], True])).encode()
    elif kind == "truncated":
        raw = json.dumps(d).encode()
        return kind, raw[: rng.randrange(0, len(raw) - 1)]
    elif kind == "schema":
        d["schema"] = rng.choice([0, 2, 99, -1, "1", None, 1.0])
    elif kind == "negative_id":
        id_field = "version" if contract is ModelUpdate else (
            "model_version" if contract is Score else rng.choice(["user_id"]))
        d[id_field] = rng.choice([-1, -(2**63), 2**64, 2**70])
    elif kind == "oversized":
        d["context" if contract in (Impression, ScoreRequest, Sample) else field] = {"k": "v" * 1_100_000}
    return kind, json.dumps(d).encode()


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_500_hostile_inputs_each_rejected_with_a_reason(contract):
    rng = random.Random(f"hostile-{contract.__name__}")
    codec = Codec(contract, LimitSettings())
    kinds: dict[str, int] = {}
    for _ in range(600):
        kind, raw = hostile(contract, rng)
        with pytest.raises(ContractError) as info:
            codec.decode(raw)
        assert info.value.reason, (kind, raw[:200])
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(kinds) == 13  # every kind of damage was tried


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
@hsettings(max_examples=300, deadline=None)
@given(raw=st.one_of(
    st.binary(max_size=2_000),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
                 lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
                 max_leaves=30).map(lambda v: json.dumps(v).encode()),
))
def test_arbitrary_bytes_raise_only_contract_errors(contract, raw):
    try:
        Codec(contract).decode(raw)
    except ContractError as e:
        assert e.reason
    else:  # the only bytes that may pass are real events (vanishingly unlikely here)
        assert isinstance(Codec(contract).decode(raw), contract)


def test_limits_come_from_settings():
    limits = LimitSettings(max_id_length=4, max_candidates=2)
    with pytest.raises(ContractError, match="user_id longer"):
        Codec(Click, limits).decode(encode(Click(event_id="e", user_id="12345", item_id=1, category_id=1, ts=TS)))
    req = valid_events()[ScoreRequest]
    with pytest.raises(ContractError, match="candidates"):
        Codec(ScoreRequest, limits).decode(encode(req))


def test_sample_sequence_must_be_strictly_before_the_impression():
    s = valid_events()[Sample]
    leaky = Sample(**{f: getattr(s, f) for f in s.__struct_fields__} | {"hist_ts": [TS - 1, TS]})
    with pytest.raises(ContractError, match="strictly before"):
        Codec(Sample).decode(encode(leaky))


def test_dead_letter_envelope_keeps_original_bytes_and_source():
    original = b'\xff{"broken'
    env = decode_dead_letter(dead_letter("malformed: x", original, "streamer", topic="t", partition=3, offset=7,
                                         key=b"u1"))
    assert (env.original, env.reason, env.source_topic, env.partition, env.offset, env.key) == (
        original, "malformed: x", "t", 3, 7, b"u1")


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
@pytest.mark.parametrize("where", ["id", "features_key", "features_value", "outside", "trailing"])
def test_invalid_utf8_anywhere_is_named_as_such(bad, where):
    """The codec leaves UTF-8 validation to msgspec's parse (every byte of a contract that forbids
    unknown fields is parsed) and checks it explicitly only to name a failure: invalid UTF-8 in
    any position is still rejected with the "utf8" reason."""
    good = {"event_id": "e1", "user_id": 1, "item_id": 2, "category_id": 3, "ts": 1_700_000_000_000,
            "item_features": {"k": "v"}}
    raw = json.dumps(good).encode()
    raw = {"id": raw.replace(b'"e1"', b'"e' + bad + b'1"'),
           "features_key": raw.replace(b'"k"', b'"k' + bad + b'"'),
           "features_value": raw.replace(b'"v"', b'"' + bad + b'"'),
           "outside": raw.replace(b', "ts"', b"," + bad + b' "ts"'),
           "trailing": raw + bad}[where]
    with pytest.raises(ContractError, match="^utf8: invalid UTF-8 at byte"):
        Codec(Impression).decode(raw)
    assert Codec(Impression).decode(json.dumps(good).encode()).item_features == {"k": "v"}
