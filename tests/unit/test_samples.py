"""The streamer's fast sample encoding writes exactly the JSON of the Sample contract."""

from __future__ import annotations

import pytest

from dmrstream.contracts import Codec, Impression, Sample, encode
from streamer.samples import SampleRow, encoded_sample, sample_id_of

T0 = 1_700_000_000_000
IMPRESSIONS = [
    Impression(event_id="i1", user_id=7, item_id=10, category_id=3, ts=T0),
    Impression(event_id="i2", user_id="u\u00e9", item_id="x", category_id="c", ts=T0 + 5, request_id="r2",
               position=4, context={"page": "home", "hour": 13}, user_profile={"age": 31, "vip": True},
               item_features={"price": 9.5, "brand": "b"}, true_ctr=0.25, sampled=True),
]
HISTORIES = [([], [], [], []), ([10, "y"], [3, "c"], ["click", "buy"], [T0 - 9, T0 - 1])]
COUNTERS = [None, {"user_impressions": 2.0, "user_clicks": 1.0, "item_impressions": 0.0, "item_clicks": 0.0}]


def test_the_row_has_the_contract_s_fields_in_its_order():
    assert SampleRow.__struct_fields__ == Sample.__struct_fields__


@pytest.mark.parametrize("imp", IMPRESSIONS)
@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("counters", COUNTERS)
@pytest.mark.parametrize("label,correction", [(0, False), (1, False), (1, True)])
def test_encoded_sample_is_the_contract_s_json(imp, history, counters, label, correction):
    items, cats, behaviors, ts = history
    expected = Sample(sample_id=sample_id_of(imp.event_id, correction), event_id=imp.event_id, user_id=imp.user_id,
                      item_id=imp.item_id, category_id=imp.category_id, ts=imp.ts, label=label,
                      hist_item_ids=items, hist_category_ids=cats, hist_behaviors=behaviors, hist_ts=ts,
                      position=imp.position, context=imp.context, user_profile=imp.user_profile,
                      item_features=imp.item_features, counters=counters, correction=correction,
                      sampled=imp.sampled, true_ctr=imp.true_ctr)
    got = encoded_sample(imp, label, history, counters, correction=correction)
    assert got == encode(expected)
    assert Codec(Sample).decode(got) == expected  # and the strict decoder takes it


def test_a_history_reaching_the_impression_is_refused():
    imp = IMPRESSIONS[0]
    with pytest.raises(ValueError, match="strictly before"):
        encoded_sample(imp, 1, ([10], [3], ["click"], [imp.ts]), None)
