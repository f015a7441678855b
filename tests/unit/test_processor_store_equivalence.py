"""The processor over the real feature store (batched history reads, counters of the batch's own
events, re-parsed impressions) gives exactly the samples of the same processor over the plain
reference store of tests/unit/test_processor.py, which recomputes everything from the events."""

from __future__ import annotations

import random

import pytest

from dmrstream.contracts import Click, Codec, Impression, Sample, encode
from dmrstream.settings import load_settings
from featurestore import open_partition_store
from streamer.processor import PartitionProcessor, Record
from tests.unit.test_processor import ReferenceStore

T0 = 1_700_000_000_000


def stream(seed: int, n: int) -> list[Record]:
    """Impressions and behaviours of a few users (int and str ids, 1 and "1" both present),
    with redelivered events and cart/buy behaviours."""
    rng = random.Random(seed)
    users = [1, "1", 2, "u3", 4, 5]
    out: list[tuple[str, Impression | Click]] = []
    for k in range(n):
        user, item = rng.choice(users), rng.choice([10, 11, "10", 12, 13])
        ts = T0 + k * 50 + rng.randrange(0, 40)
        out.append(("p.impressions", Impression(event_id=f"i{k}", user_id=user, item_id=item, category_id=1, ts=ts,
                                                request_id=f"r{k}", position=k % 4, context={"page": "home"})))
        if rng.random() < 0.4:
            out.append(("p.clicks", Click(event_id=f"c{k}", user_id=user, item_id=item, category_id=1,
                                          ts=ts + rng.randrange(0, 3_000), request_id=f"r{k}",
                                          behavior=rng.choice(["click", "click", "cart", "buy"]))))
        if rng.random() < 0.05:
            # A redelivered recent event (an older one would meet the store's documented counter
            # approximation for times before its newest kept points).
            out.append(rng.choice(out[-3:]))
    return [Record(topic, 0, i, str(ev.user_id).encode(), encode(ev)) for i, (topic, ev) in enumerate(out)]


def samples(proc: PartitionProcessor, records: list[Record], batch: int) -> list[Sample]:
    codec, out = Codec(Sample), []
    for i in range(0, len(records), batch):
        res = proc.process(records[i:i + batch])
        proc.commit(res)
        out += [codec.decode(v) for t, _, v in res.messages if t == "p.samples"]
    return out


@pytest.mark.parametrize("positives_at", ["click", "window_close"])
@pytest.mark.parametrize("batch", [1, 37, 500])
def test_real_store_samples_equal_the_reference_stores(tmp_path, positives_at, batch):
    s = load_settings(overrides={"state_dir": str(tmp_path), "topics.prefix": "p.",
                                 "join.attribution_window_ms": 2_000, "join.positives_at": positives_at})
    records = stream(7, 600)
    real = samples(PartitionProcessor(0, open_partition_store(s, 0), s), records, batch)
    ref = samples(PartitionProcessor(0, ReferenceStore(), s), records, batch)
    assert len(real) > 400 and any(x.hist_item_ids for x in real) and any(x.label for x in real)
    assert real == ref
