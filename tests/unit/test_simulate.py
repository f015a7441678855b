"""The simulator: reproducible by seed, time-ordered, and its oracle clearly beats popularity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dmrstream.contracts import Click, Codec, Impression, encode
from replay.evaluate import auc, reference_aucs
from replay.eventsfile import read_events
from replay.records import BadRows
from replay.runner import flatten, run
from replay.simulate import SimConfig, World, simulate
from replay.sinks import JsonlSink

SMALL = SimConfig(users=2_000, items=5_000, categories=50, seed=11)


@pytest.fixture(scope="module")
def stream():
    return list(simulate(SMALL, events=120_000))


def test_same_seed_same_stream_other_seed_other_stream():
    a = [encode(e) for e in simulate(SMALL, events=5_000)]
    b = [encode(e) for e in simulate(SMALL, events=5_000)]
    c = [encode(e) for e in simulate(SimConfig(users=2_000, items=5_000, categories=50, seed=12), events=5_000)]
    assert a == b and a != c


def test_stream_is_time_ordered_valid_and_clicks_follow_their_impression(stream):
    assert len(stream) == 120_000
    assert all(a.ts <= b.ts for a, b in zip(stream, stream[1:]))
    imps = {e.request_id: e for e in stream if isinstance(e, Impression)}
    clicks = [e for e in stream if isinstance(e, Click)]
    assert len({e.event_id for e in stream}) == len(stream)
    for c in clicks[:5000]:
        imp = imps[c.request_id]  # every click has its impression, earlier, same user and item
        assert (imp.user_id, imp.item_id, imp.category_id) == (c.user_id, c.item_id, c.category_id)
        assert 1_000 <= c.ts - imp.ts <= 9_500
    assert all(e.true_ctr is not None and 0 < e.true_ctr < 1 and e.position is not None for e in imps.values())
    ctr = len(clicks) / len(imps)
    assert 0.03 < ctr < 0.3
    codec = Codec(Impression), Codec(Click)
    for e in stream[:1000]:
        codec[isinstance(e, Click)].decode(encode(e))


def test_oracle_well_above_chance_and_popularity_clearly_below_it(stream):
    r = reference_aucs(stream)
    assert r.oracle_auc > 0.75
    assert 0.5 < r.popularity_auc < r.oracle_auc - 0.1


def test_recent_clicks_raise_click_probability(stream):
    """The click probability depends on the behaviour sequence: an impression whose category the
    user clicked recently is clicked much more often than one whose category they did not."""
    last_cats: dict[int, list] = {}
    with_seq, without = [], []
    for e in stream:
        if isinstance(e, Click):
            last_cats.setdefault(e.user_id, []).append(e.category_id)
            last_cats[e.user_id] = last_cats[e.user_id][-8:]
        else:
            (with_seq if e.category_id in last_cats.get(e.user_id, []) else without).append(e.true_ctr)
    assert np.mean(with_seq) > 2 * np.mean(without)


def test_item_popularity_is_power_law():
    world = World(SMALL)
    counts = np.bincount(world.sample_items(np.zeros(20_000, dtype=np.int64)).ravel(), minlength=SMALL.items)
    top = np.sort(counts)[::-1]
    assert top[:50].sum() > 0.2 * counts.sum()  # 1 % of the items take a fifth of the impressions


def test_memory_is_bounded_by_the_world_not_the_stream():
    """The carry-over between batches stays within a few sessions' worth of events."""
    from replay.simulate import event_arrays

    sizes = [len(chunk["ts"]) for chunk in itertools.islice(event_arrays(SMALL), 30)]
    assert max(sizes) < 3 * SMALL.batch_sessions * SMALL.page_size * SMALL.max_pages


def test_simulate_to_file_and_replay_it_back(tmp_path):
    path = tmp_path / "sim.jsonl"
    events = list(simulate(SMALL, events=3_000))
    summary = run(iter(events), JsonlSink(path))
    assert summary.events == 3_000 and summary.delivery_failures == 0
    bad = BadRows()
    back = list(flatten(read_events(path, 0, bad, Codec(Impression).limits)))
    assert back == events and bad.count == 0


def test_auc_reference_values():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert np.isnan(auc([0.1, 0.2], [1, 1]))


def test_popularity_baseline_uses_only_strictly_earlier_events():
    def imp(n, ts, item, ctr=0.5):
        return Impression(event_id=f"{n}:i", user_id=n, item_id=item, category_id=0, ts=ts, request_id=str(n),
                          true_ctr=ctr)

    def click(n, ts, item):
        return Click(event_id=f"{n}:c", user_id=n, item_id=item, category_id=0, ts=ts, request_id=str(n))

    from replay.evaluate import ReferenceAUCs

    ref = ReferenceAUCs()
    for ev in [imp(1, 1000, "a"), click(1, 2000, "a"), imp(2, 2000, "a"), imp(3, 3000, "a"), imp(4, 3000, "b")]:
        ref.add(ev)
    p = list(ref.pop)
    # Score = (item clicks + 5 * global rate) / (item impressions + 5), global rate (c+1)/(n+2).
    # Impression 2 shares its ts with the click: it sees impression 1 but not the click.
    assert p[0] == pytest.approx(0.5)
    assert p[1] == pytest.approx((0 + 5 * (1 / 3)) / (1 + 5))
    assert p[2] == pytest.approx((1 + 5 * (2 / 4)) / (2 + 5))  # now it does: 1 click, 2 impressions
    assert list(ref.labels) == [1, 0, 0, 0]


def test_events_file_bad_lines_are_counted_with_reasons(tmp_path):
    path = tmp_path / "events.jsonl"
    good = list(simulate(SMALL, events=4))
    lines = [encode(e) for e in good]
    lines.insert(2, b'{"schema":1,"event_id":"x","user_id":1,"item_id":2,"category_id":3,"ts":5}')  # 1970
    lines.insert(3, b"not json")
    lines.append(b'{"schema":1,"event_id":"y","user_id":1,"item_id":2,"category_id":3,"ts":1704067200000,'
                 b'"behavior":"like"}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = BadRows()
    back = list(flatten(read_events(path, 0, bad, Codec(Impression).limits)))
    assert back == good
    assert [line for _, line, _ in bad.first] == [3, 4, 7]
    assert "limit: ts" in bad.first[0][2] and "malformed" in bad.first[1][2] and "behavior" in bad.first[2][2]


def test_reference_over_a_prefix_scores_only_the_impressions_up_to_that_time():
    from replay.evaluate import ReferenceAUCs

    events = list(simulate(SimConfig(users=300, items=500, seed=4), 6000))
    ref = ReferenceAUCs(60_000)
    for ev in events:
        ref.add(ev)
    whole = ref.result()
    assert ref.result(until_ts=events[-1].ts) == whole
    mid = events[len(events) // 2].ts
    part = ref.result(until_ts=mid)
    assert part.impressions == sum(1 for e in events if isinstance(e, Impression) and e.ts <= mid)
    assert 0 < part.impressions < whole.impressions
    assert 0.5 < part.popularity_auc < 1 and part.popularity_auc != whole.popularity_auc


def test_reference_labels_a_request_of_several_items_by_the_clicked_item():
    from replay.evaluate import ReferenceAUCs

    def imp(n, item):
        return Impression(event_id=f"{n}:i", user_id=1, item_id=item, category_id=0, ts=1000, request_id="r")

    ref = ReferenceAUCs()
    for ev in [imp(1, "a"), imp(2, "b"), imp(3, "c"),
               Click(event_id="c", user_id=1, item_id="a", category_id=0, ts=2000, request_id="r")]:
        ref.add(ev)
    assert list(ref.labels) == [1, 0, 0]  # the clicked item's impression, not the request's last
