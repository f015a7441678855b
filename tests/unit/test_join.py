"""Label-join rules without Kafka: windows, watermark, matching, late clicks, persistence."""

from __future__ import annotations

import random
from functools import partial

import pytest

from streamer.join import Deadlines, LabelJoin

W = 1_000
T0 = 1_700_000_000_000


# The rules below are stated with positives emitted at the click; the default holds them to the
# window's close, tested against this form at the end.
AtClick = partial(LabelJoin, positives_at="click")


def kinds(outcomes):
    return [(o.kind, o.impression_id) for o in outcomes]


def imp(j, eid, ts, user="u", item="i", req=None):
    return j.on_impression(eid, user, item, T0 + ts, req, f"raw-{eid}".encode())


def clk(j, eid, ts, user="u", item="i", req=None):
    return j.on_click(eid, user, item, T0 + ts, req)


def test_click_inside_window_labels_positive_at_once():
    j = AtClick(W)
    assert imp(j, "a", 0) == []
    out = clk(j, "c", 500)
    assert kinds(out) == [("positive", "a")]
    assert out[0].raw == b"raw-a" and out[0].click_ts == T0 + 500


def test_negative_only_once_watermark_passes_ts_plus_window():
    j = AtClick(W)
    imp(j, "a", 0)
    clk(j, "other", 0, item="x")  # clicks input seen, so the watermark is defined
    assert imp(j, "b", W, item="z") == []  # watermark == ts + W: not passed yet
    clk(j, "other2", W, item="y")
    out = imp(j, "c", W + 1, item="z2") + clk(j, "o3", W + 1, item="y2")
    assert kinds(out) == [("negative", "a")]


def test_click_after_window_does_not_label_and_is_not_late():
    j = AtClick(W)
    imp(j, "a", 0)
    out = clk(j, "c", W + 1)
    assert out == [] or all(o.kind == "negative" for o in out)
    assert "a" not in j.pending or j.pending["a"].ts == T0


def test_late_click_counted_and_corrected_when_enabled():
    for corrections in (False, True):
        j = AtClick(W, emit_corrections=corrections)
        imp(j, "a", 0)
        clk(j, "x", 0, item="other")
        # The clicks input runs ahead (watermark = min over inputs), then a late click for "a".
        imp(j, "b", 2 * W, item="b")
        out = clk(j, "y", 2 * W, item="other")
        assert kinds(out) == [("negative", "a")]
        late = clk(j, "c", 900)  # inside a's window, but after a went out as 0
        want = [("late_click", "a")] + ([("correction", "a")] if corrections else [])
        assert kinds(late) == want
        assert clk(j, "c2", 950) == []  # a second late click is not counted twice


def test_request_id_match_beats_user_item_nearest():
    j = AtClick(W)
    imp(j, "old", 0, req="r-old")
    imp(j, "new", 100, req="r-new")
    assert kinds(clk(j, "c", 200, req="r-old")) == [("positive", "old")]
    assert "new" in j.pending


def test_a_request_of_several_items_labels_each_by_its_own_click():
    # One request shows several items (one request id): a click names the request AND the item.
    j = AtClick(W)
    imp(j, "a", 0, item="i1", req="r")
    imp(j, "b", 0, item="i2", req="r")
    imp(j, "c", 0, item="i3", req="r")
    assert kinds(clk(j, "c1", 10, item="i1", req="r")) == [("positive", "a")]
    assert kinds(clk(j, "c2", 20, item="i3", req="r")) == [("positive", "c")]
    assert clk(j, "c3", 30, item="i9", req="r") == []  # an item the request did not show
    assert set(j.pending) == {"b"}
    # the same when the clicks are read before their impressions (another user's impression
    # holds the watermark at 0, as the merge would)
    j = AtClick(W)
    imp(j, "other", 0, user="v")
    assert clk(j, "c2", 10, item="i2", req="r") == [] and clk(j, "c1", 20, item="i1", req="r") == []
    assert [(o.impression_id, o.click_ts) for o in imp(j, "a", 0, item="i1", req="r")] == [("a", T0 + 20)]
    assert [(o.impression_id, o.click_ts) for o in imp(j, "b", 0, item="i2", req="r")] == [("b", T0 + 10)]
    assert kinds(imp(j, "c", 0, item="i3", req="r")) == []


def test_without_request_id_nearest_earlier_impression_wins():
    j = AtClick(W)
    imp(j, "first", 0)
    imp(j, "second", 300)
    imp(j, "future", 900)
    assert kinds(clk(j, "c", 500)) == [("positive", "second")]
    assert kinds(clk(j, "c2", 950)) == [("positive", "future")]
    assert kinds(clk(j, "c3", 960)) == [("positive", "first")]


def test_click_read_before_its_impression_still_labels_it():
    j = AtClick(W)
    assert clk(j, "c", 10, req="r1") == []
    assert kinds(imp(j, "a", 5, req="r1")) == [("positive", "a")]
    assert clk(j, "c-other", 10, item="zz") == []
    assert kinds(imp(j, "b", 0, item="zz")) == [("positive", "b")]  # (user, item) match, click after impression


def test_early_clicks_of_many_users_each_label_their_own_impression_and_then_are_forgotten():
    # Clicks held before their impressions (held longer with allowed lateness), for many users:
    # each impression takes its own user's click (request id first, else the earliest on its
    # item), never another user's; what is taken or passed by the watermark leaves the state.
    j = AtClick(W, lateness_ms=5 * W)
    for u in range(50):
        assert clk(j, f"c{u}-item", 20, user=f"u{u}") == []
        assert clk(j, f"c{u}-req", 30, user=f"u{u}", item="other", req=f"r{u}") == []
        assert clk(j, f"c{u}-item-later", 40, user=f"u{u}") == []
    assert len(j.early) == 150
    for u in range(50):
        by_request = j.on_impression(f"a{u}", f"u{u}", "other", T0 + 10, f"r{u}", b"raw")
        by_item = j.on_impression(f"b{u}", f"u{u}", "i", T0 + 10, None, b"raw")
        assert [(o.kind, o.impression_id, o.click_ts) for o in by_request + by_item] == [
            ("positive", f"a{u}", T0 + 30), ("positive", f"b{u}", T0 + 20)]
    assert set(j.early) == {f"c{u}-item-later" for u in range(50)}
    imp(j, "far", 100 * W, user="z")
    clk(j, "far-c", 100 * W, user="z", item="zz")  # both inputs far ahead: the watermark passes the rest
    assert set(j.early) == {"far-c"} and list(j._early_by_pair) == [("z", "zz")]


def test_impressions_sharing_user_and_item_stay_matchable_as_they_come_and_go():
    # The (user, item) index holds one id, or a set when several impressions share the pair.
    j = AtClick(W)
    imp(j, "a", 0)
    imp(j, "b", 100)
    assert kinds(clk(j, "c1", 150)) == [("positive", "b")]  # nearest earlier still waiting
    assert kinds(clk(j, "c2", 160)) == [("positive", "a")]
    imp(j, "c", 1_500)
    imp(j, "far", 2_200, user="z")
    clk(j, "far-c", 2_200, user="z", item="zz")  # a and b are forgotten (past 2 W), c waits
    assert set(j.done) == set() and set(j.pending) == {"c", "far"}
    assert kinds(clk(j, "c3", 2_300)) == [("positive", "c")]
    imp(j, "end", 10**6, user="y")
    clk(j, "end-c", 10**6, user="y", item="yy")
    assert set(j.pending) == {"end"} and j._by_user_item == {("y", "i"): "end"}


def test_deadlines_come_out_in_deadline_then_id_order_and_skip_ids_that_are_gone():
    live = {"a": 10, "b": 20, "c": 20, "d": 5, "e": 30, "f": 25}
    due = Deadlines(live.get)
    for eid in ["a", "c", "b", "d", "e", "f"]:  # d and f out of order
        due.push(eid)
    assert len(due) == 6 and len(due._late) == 2  # only those two cost a heap entry
    assert not due.any_due(5) and due.any_due(6)
    del live["a"]  # labelled by a click meanwhile
    assert due.pop_due(21) == ["d", "b", "c"]  # d from the out-of-order ones; a gone; ties by id
    assert not due.any_due(25) and due.any_due(26)
    assert due.pop_due(10**9) == ["f", "e"]
    assert len(due) == 0 and not due.any_due(10**9)
    rng = random.Random(3)  # against a plain sort, with ids going away at random
    times = {f"x{k}": rng.randrange(1000) + k * rng.choice([0, 5]) for k in range(300)}
    due = Deadlines(times.get)
    for eid in times:
        due.push(eid)
    for eid in rng.sample(sorted(times), 60):
        del times[eid]
    got = []
    for wm in range(0, 3000, 97):
        got += due.pop_due(wm)
    got += due.pop_due(10**9)
    assert [e for e in got if e in times] == sorted(times, key=lambda e: (times[e], e))


def test_redelivered_events_change_nothing():
    j = AtClick(W)
    imp(j, "a", 0)
    assert kinds(clk(j, "c", 10)) == [("positive", "a")]
    assert imp(j, "a", 0) == []  # redelivered impression
    assert clk(j, "c", 10) == []  # redelivered click
    assert j.duplicates == 2


def test_users_are_kept_apart():
    j = AtClick(W)
    imp(j, "a", 0, user="u1")
    assert clk(j, "c", 10, user="u2") == []
    assert "a" in j.pending


def test_idle_input_drops_out_of_watermark():
    j = AtClick(W)
    imp(j, "a", 0)
    clk(j, "x", 0, item="other")
    assert imp(j, "b", 5 * W, item="b") == []  # clicks input stalled at T0: no expiry
    assert kinds(j.set_idle("clicks", True)) == [("negative", "a")]


def _random_run(j: LabelJoin, events) -> list[tuple[str, str]]:
    out = []
    for kind, args in events:
        out += kinds(imp(j, *args) if kind == "i" else clk(j, *args))
    return out


def _events(seed: int, n: int = 400):
    rng = random.Random(seed)
    evs = []
    t = 0
    for k in range(n):
        t += rng.randrange(0, 300)
        user, item = f"u{rng.randrange(5)}", f"i{rng.randrange(4)}"
        req = f"r{k}" if rng.random() < 0.5 else None
        evs.append(("i", (f"imp{k}", t, user, item, req)))
        if rng.random() < 0.4:
            evs.append(("c", (f"clk{k}", t + rng.randrange(0, 2 * W), user, item, req)))
    return evs


@pytest.mark.parametrize("positives_at", ["click", "window_close"])
def test_restore_from_persisted_changes_continues_identically(positives_at):
    make = partial(LabelJoin, W, emit_corrections=True, positives_at=positives_at)
    for seed in range(5):
        evs = _events(seed)
        straight = _random_run(make(), evs)
        store: dict[bytes, bytes] = {}
        j = make()
        resumed = []
        for k, ev in enumerate(evs):
            resumed += _random_run(j, [ev])
            for key, val in j.drain_changes().items():
                if val is None:
                    store.pop(key, None)
                else:
                    store[key] = val
            if k % 37 == 0:  # "crash": rebuild the join from what was persisted
                j = make()
                j.restore(sorted(store.items()))
        assert resumed == straight


def _persist(store: dict, changes: dict) -> int:
    """Apply drained changes to ``store``; returns how many deletes named a key it did not hold."""
    stray = 0
    for key, val in changes.items():
        if val is None:
            stray += key not in store
            store.pop(key, None)
        else:
            store[key] = val
    return stray


@pytest.mark.parametrize("every", [7, 60, 10_000])
@pytest.mark.parametrize("positives_at", ["click", "window_close"])
def test_persisted_state_does_not_depend_on_how_often_changes_are_drained(every, positives_at):
    """Drained every ``every`` events, the persisted state equals the one drained after every
    event (records encoded as of the drain), and no delete is written for a key never written
    (an impression pending and labelled between two drains costs no write at all)."""
    make = partial(LabelJoin, W, emit_corrections=True, positives_at=positives_at)
    evs = _events(11, 600)
    each, batched, stray, most = {}, {}, 0, 0
    j_each, j = make(), make()
    for k, ev in enumerate(evs, 1):
        _random_run(j_each, [ev])
        stray += _persist(each, j_each.drain_changes())
        most = max(most, len(each))
        _random_run(j, [ev])
        if k % every == 0 or k == len(evs):
            stray += _persist(batched, j.drain_changes())
            assert batched == each
    assert stray == 0 and most > 15


@pytest.mark.parametrize("positives_at", ["click", "window_close"])
def test_every_impression_gets_exactly_one_label(positives_at):
    evs = _events(7, 600)
    j = LabelJoin(W, positives_at=positives_at)
    out = _random_run(j, evs)
    out += kinds(j.set_idle("clicks", True))
    # flush: one far-future event on both inputs
    out += kinds(imp(j, "end", 10**9, user="z")) + kinds(clk(j, "end-c", 10**9, user="zz"))
    labelled = [iid for k, iid in out if k in ("positive", "negative")]
    impressions = [a[0] for k, a in evs if k == "i"]
    assert sorted(labelled) == sorted(impressions)


def test_click_naming_an_unseen_request_waits_for_it_instead_of_labelling_another():
    j = AtClick(W)
    imp(j, "earlier", 0, req="r-earlier")  # same user and item, another request
    assert clk(j, "c", 500, req="r-later") == []  # its own impression is not read yet
    assert "earlier" in j.pending
    assert kinds(imp(j, "later", 400, req="r-later")) == [("positive", "later")]


def _flushed(j: LabelJoin, evs) -> list:
    out = []
    for kind, args in evs:
        out += imp(j, *args) if kind == "i" else clk(j, *args)
    out += j.set_idle("clicks", True)
    return out + imp(j, "end", 10**9, user="z") + clk(j, "end-c", 10**9, user="zz")


def test_default_holds_a_positive_until_its_window_closes():
    j = LabelJoin(W)
    imp(j, "a", 0)
    assert clk(j, "c", 500) == []  # matched, but held
    assert j.pending["a"].click_ts == T0 + 500
    assert clk(j, "c", 500) == [] and clk(j, "c2", 600) == []  # redelivered / second click
    assert j.duplicates == 2
    assert imp(j, "b", W, item="z") == []  # watermark == ts + W: not passed yet
    out = clk(j, "x", W + 1, item="y") + imp(j, "d", W + 1, item="z2")
    assert kinds(out) == [("positive", "a")]
    assert out[0].raw == b"raw-a" and out[0].click_ts == T0 + 500


def test_default_holds_a_positive_whose_click_came_first():
    j = LabelJoin(W)
    assert clk(j, "c", 10, req="r1") == []
    assert imp(j, "a", 5, req="r1") == []
    out = clk(j, "x", 2 * W, item="y") + imp(j, "b", 2 * W, item="z")
    assert kinds(out) == [("positive", "a")] and out[0].click_ts == T0 + 10


@pytest.mark.parametrize("seed", range(6))
def test_window_close_emits_the_same_outcomes_as_at_click_in_impression_time_order(seed):
    """Same matches, labels, click times and late clicks in both modes; only the timing differs:
    held, every label leaves in impression-time order."""
    evs = _events(seed, 500)
    at_click = _flushed(AtClick(W, emit_corrections=True), evs)
    held = _flushed(LabelJoin(W, emit_corrections=True), evs)
    key = lambda o: (o.kind, o.impression_id, o.click_ts, o.raw)  # noqa: E731
    assert sorted(map(key, held)) == sorted(map(key, at_click))
    labels = [o.impression_ts for o in held if o.kind in ("positive", "negative")]
    assert labels == sorted(labels)
    assert sum(o.kind == "positive" for o in held) > 20  # the stream really has positives


def test_positives_at_rejects_unknown_values():
    with pytest.raises(ValueError):
        LabelJoin(W, positives_at="later")


def test_kept_watermark_equals_its_definition_after_every_step():
    """The watermark is kept current instead of recomputed per event: after every event, idle
    toggle and restore it is still min over active inputs of the highest time, minus lateness."""
    rng = random.Random(3)
    j = LabelJoin(W, lateness_ms=50)
    store: dict[bytes, bytes] = {}

    def defined(join):
        active = [t for name, t in join.high.items() if name not in join.idle]
        return min(active) - join.lateness if active else None

    for k, (kind, args) in enumerate(_events(11, 300)):
        if rng.random() < 0.05:
            j.set_idle(rng.choice(["impressions", "clicks"]), rng.random() < 0.5)
        else:
            imp(j, *args) if kind == "i" else clk(j, *args)
        assert j.watermark == defined(j)
        for key, val in j.drain_changes().items():
            store.pop(key, None) if val is None else store.__setitem__(key, val)
        if k % 50 == 49:
            j = LabelJoin(W, lateness_ms=50)
            j.restore(sorted(store.items()))
            assert j.watermark == defined(j)
