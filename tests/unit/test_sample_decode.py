"""The trainer's columnar sample decoding (trainer/sample_decode.py) against the per-message codec:
the same batch whenever it takes a batch, and never a batch the codec would refuse any of."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import msgspec
import numpy as np
import pytest

from dmrstream.contracts import Codec, ContractError, Sample, encode
from dmrstream.settings import load_settings
from trainer.features import columns_to_batch, samples_to_batch
from trainer.sample_decode import SampleColumnsDecoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from hostile import hostile  # noqa: E402

SETTINGS = load_settings(overrides={"features.seq_len": 8})
CODEC = Codec(Sample, SETTINGS.limits)


def samples(n: int, seed: int = 0) -> list[Sample]:
    """Varied valid samples: empty and longer-than-T sequences, every behaviour, string top-level
    ids, maps present or absent, ids up to just below 10^18."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.choice([0, 1, 3, 8, 13]))
        items = [int(x) for x in rng.integers(0, 10**18, L)] if i % 7 == 0 else rng.integers(0, 500, L).tolist()
        out.append(Sample(
            sample_id=f"s{i}", event_id=f"e{i}", user_id=f"u{i % 5}" if i % 3 == 0 else i % 5,
            item_id=int(rng.integers(0, 500)), category_id=int(rng.integers(0, 20)), ts=10**12 + i,
            label=i % 2, hist_item_ids=items, hist_category_ids=[x % 20 for x in items],
            hist_behaviors=[["click", "cart", "fav", "buy"][j % 4] for j in range(L)],
            hist_ts=[10**12 - 1000 * (L - j) for j in range(L)],
            counters=None if i % 4 == 0 else {"user_impressions": float(i), "item_clicks": 1.0},
            user_profile={"age": i % 3} if i % 2 else None, context={"pid": 1}, position=i % 3 or None))
    return out


def assert_same_batches(payloads: list[bytes]) -> None:
    decoded = SampleColumnsDecoder(SETTINGS.limits).decode(payloads)
    assert decoded is not None
    expected = [CODEC.decode(p) for p in payloads]
    assert decoded.sample_ids == [s.sample_id for s in expected]
    assert decoded.ts.tolist() == [s.ts for s in expected]
    ours, theirs = columns_to_batch(decoded.columns, SETTINGS), samples_to_batch(expected, SETTINGS)
    for f in fields(ours):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        assert (a is None and b is None) or np.array_equal(a, b), f.name


def test_valid_samples_decode_to_the_same_batch():
    assert_same_batches([encode(s) for s in samples(200)])
    # one behaviour type throughout (the common case, read without walking the tokens)
    carts = [msgspec.structs.replace(s, hist_behaviors=["cart"] * len(s.hist_behaviors)) for s in samples(50)]
    assert_same_batches([encode(s) for s in carts])


def test_a_string_id_in_a_sequence_goes_to_the_per_message_path():
    batch = samples(20)
    k = next(i for i, smp in enumerate(batch) if smp.hist_item_ids)
    batch[k] = msgspec.structs.replace(batch[k], hist_item_ids=["sku-1"] * len(batch[k].hist_item_ids))
    payloads = [encode(smp) for smp in batch]
    CODEC.decode(payloads[k])  # valid: only this fast path declines it
    assert SampleColumnsDecoder(SETTINGS.limits).decode(payloads) is None


@pytest.mark.parametrize("text", [
    b'"hist_item_ids":[ 1 , 2 ]', b'"hist_behaviors":["\\u0063lick","click"]', b'"hist_item_ids":[1,2]  ',
])
def test_other_spellings_of_valid_json_give_the_codecs_batch_or_none(text):
    """Whitespace and escapes are valid JSON: the fast path either reads them right or declines."""
    base = (b'{"schema":1,"sample_id":"a","event_id":"a","user_id":1,"item_id":2,"category_id":3,'
            b'"ts":1000000000000,"label":1,"hist_item_ids":[1,2],"hist_category_ids":[1,2],'
            b'"hist_behaviors":["click","click"],"hist_ts":[1,2]}')
    key = text.split(b":")[0]
    start = base.index(key)
    end = base.index(b"]", start) + 1
    payload = base[:start] + text + base[end:]
    CODEC.decode(payload)  # valid
    decoded = SampleColumnsDecoder(SETTINGS.limits).decode([payload])
    if decoded is not None:
        assert_same_batches([payload])


@pytest.mark.parametrize("values, verdict", [
    (b"[999999999999999999]", "fast"),  # 10^18 - 1
    (b"[1000000000000000000]", "none"),  # 10^18: past the fast path's int64-safe range
    (b"[9223372036854775807]", "none"),  # 2^63 - 1: valid, per message
    (b"[9223372036854775808]", "refused"),  # 2^63: past the contract's id bound
    (b"[-1]", "refused"), (b"[1.0]", "refused"), (b"[true]", "refused"), (b"[null]", "refused"),
    (b'["1"]', "none"),  # a string id: valid, per message
])
def test_integer_bounds_match_the_contract(values, verdict):
    payload = (b'{"schema":1,"sample_id":"a","event_id":"a","user_id":1,"item_id":2,"category_id":3,'
               b'"ts":1000000000000,"label":1,"hist_item_ids":' + values + b',"hist_category_ids":[1],'
               b'"hist_behaviors":["click"],"hist_ts":[1]}')
    decoded = SampleColumnsDecoder(SETTINGS.limits).decode([payload])
    if verdict == "refused":
        with pytest.raises(ContractError):
            CODEC.decode(payload)
        assert decoded is None
    elif verdict == "none":
        CODEC.decode(payload)
        assert decoded is None
    else:
        assert_same_batches([payload])


def test_every_hostile_sample_sends_its_batch_to_the_per_message_path():
    """Among good samples, any message the codec refuses makes the columnar decode decline the
    batch (the per-message path then dead-letters exactly that one)."""
    good = [encode(s) for s in samples(8)]
    decoder = SampleColumnsDecoder(SETTINGS.limits)
    bad = hostile("samples", n=300, big=0, oversize=2, huge_keys=0)
    refused = 0
    for b in bad:
        try:
            CODEC.decode(b.value)
            continue  # a few generated variants are valid samples: nothing to check
        except ContractError:
            refused += 1
        assert decoder.decode(good[:4] + [b.value] + good[4:]) is None, b.kind
    assert refused > 250
    assert decoder.decode(good) is not None
