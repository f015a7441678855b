"""The merge of the streamer's two inputs into event-time order (pure logic)."""

from __future__ import annotations

from streamer.reorder import EventTimeMerger

IMP, CLK = "impressions", "clicks"


def push(m, source, ts, eid):
    m.push(source, ts, eid, eid.encode(), eid)


def ids(released):
    return [d for _, _, d in released]


def test_nothing_is_released_before_every_input_is_seen_then_time_order_with_impressions_first():
    m = EventTimeMerger((IMP, CLK))
    for ts, eid in [(30, "i30"), (10, "i10"), (20, "i20")]:
        push(m, IMP, ts, eid)
    assert m.pop_ready() == [] and m.watermark is None
    push(m, CLK, 20, "c20")
    push(m, CLK, 5, "c5")  # out of order within its topic
    assert ids(m.pop_ready()) == ["c5", "i10", "i20", "c20"]  # equal times: impressions first
    assert ids(m.pop_ready()) == [] and len(m) == 1
    push(m, CLK, 40, "c40")
    assert ids(m.pop_ready()) == ["i30"]


def test_an_idle_input_drops_out_and_late_events_pass_at_once():
    m = EventTimeMerger((IMP, CLK))
    push(m, CLK, 1, "c1")
    push(m, IMP, 100, "i100")
    push(m, IMP, 200, "i200")
    assert ids(m.pop_ready()) == ["c1"]
    m.set_idle(CLK, True)
    assert ids(m.pop_ready()) == ["i100", "i200"]
    push(m, CLK, 50, "c50")  # the idle input comes back with older events: they are late
    assert ids(m.pop_ready()) == ["c50"]
    assert CLK not in m.idle


def test_changes_hold_only_what_still_waits_and_restore_rebuilds_it():
    m = EventTimeMerger((IMP, CLK))
    push(m, IMP, 10, "i10")
    push(m, CLK, 10, "c10")
    push(m, IMP, 20, "i20")
    push(m, IMP, 20, "i20")  # a repeat (redelivery) is ignored
    assert ids(m.pop_ready()) == ["i10", "c10"]
    changes = m.drain_changes()
    waiting = {k: v for k, v in changes.items() if k.startswith(b"m/")}
    assert len(waiting) == 1 and all(v is not None for v in waiting.values())  # i10/c10 never written
    again = EventTimeMerger((IMP, CLK))
    again.restore(((k, v) for k, v in changes.items() if v is not None), decode=lambda source, raw: raw.decode())
    assert len(again) == 1 and again.high == {IMP: 20, CLK: 10} and again.released_to == 10
    push(again, CLK, 25, "c25")
    assert ids(again.pop_ready()) == ["i20"]
    deleted = again.drain_changes()
    # i20 released: deleted; c25 waits for the impressions to reach 25: written
    assert sorted((v for k, v in deleted.items() if k.startswith(b"m/")), key=bool) == [None, b"\x01c25"]


def test_negative_times_sort_correctly():
    m = EventTimeMerger((IMP, CLK))
    push(m, IMP, 5, "i5")
    push(m, IMP, -5, "i-5")
    push(m, CLK, 10, "c10")
    assert ids(m.pop_ready()) == ["i-5", "i5"]
