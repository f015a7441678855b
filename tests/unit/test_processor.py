"""The streamer's per-partition processing without Kafka, over a plain in-memory reference store:
leakage, point-in-time counters, dead letters, redelivery, crash between produce and commit."""

from __future__ import annotations

import json

from dmrstream.contracts import Click, Codec, Impression, Sample, decode_dead_letter, encode
from dmrstream.settings import load_settings
from streamer.processor import PartitionProcessor, Record

T0 = 1_700_000_000_000
W = 60_000


class ReferenceStore:
    """The simplest correct store: every event kept, everything recomputed on read."""

    def __init__(self):
        self.events: dict[str, Impression | Click] = {}
        self.extra: dict[bytes, bytes] = {}

    def apply(self, events, *, offsets=None, extra_changes=None, counters_at=None):
        for k, v in (extra_changes or {}).items():
            if v is None:
                self.extra.pop(k, None)
            else:
                self.extra[k] = v
        for e in events:
            self.events.setdefault(e.event_id, e)
        if counters_at is not None:  # everything strictly before each impression, the batch included
            for e in events:
                if isinstance(e, Impression):
                    counters_at[id(e)] = self.counters_as_of(e.user_id, e.item_id, e.ts)

    def get_sequence(self, user_id, as_of=None):
        seq = [(e.item_id, e.category_id, e.behavior, e.ts) for e in self.events.values()
               if isinstance(e, Click) and e.user_id == user_id and (as_of is None or e.ts < as_of)]
        return sorted(seq, key=lambda x: x[3])[-50:]

    def histories_many(self, user_ids, as_of):
        seqs = [self.get_sequence(u, t) for u, t in zip(user_ids, as_of)]
        return [tuple([b[k] for b in seq] for k in range(4)) for seq in seqs]

    def counters_as_of(self, user_id, item_id, ts):
        out = {"user_impressions": 0.0, "user_clicks": 0.0, "item_impressions": 0.0, "item_clicks": 0.0}
        for e in self.events.values():
            if e.ts >= ts:
                continue
            kind = "impressions" if isinstance(e, Impression) else "clicks"
            if isinstance(e, Click) and e.behavior != "click":
                continue
            if e.user_id == user_id:
                out[f"user_{kind}"] += 1
            if e.item_id == item_id:
                out[f"item_{kind}"] += 1
        return out

    def iter_extra(self, prefix):
        return sorted((k, v) for k, v in self.extra.items() if k.startswith(prefix))


def settings(positives_at="click"):
    # Most tests state the rules with a positive leaving at its click; the default (held to the
    # window's close) is tested by the leakage test below and in tests/unit/test_join.py.
    return load_settings(overrides={"join.attribution_window_ms": W, "topics.prefix": "p.",
                                    "join.positives_at": positives_at})


def rec(topic, ev, offset=0):
    return Record(f"p.{topic}", 0, offset, str(ev.user_id).encode(), encode(ev))


def imp(eid, ts, user=1, item=10, req=None):
    return Impression(event_id=eid, user_id=user, item_id=item, category_id=item % 3, ts=T0 + ts, request_id=req)


def clk(eid, ts, user=1, item=10, req=None):
    return Click(event_id=eid, user_id=user, item_id=item, category_id=item % 3, ts=T0 + ts, request_id=req)


def run(proc, records):
    res = proc.process(records)
    proc.commit(res)
    return res


def samples_of(res):
    codec = Codec(Sample)
    return [codec.decode(v) for t, _, v in res.messages if t == "p.samples"]


def test_leakage_click_one_second_later_is_not_in_its_own_sample_but_in_the_next():
    proc = PartitionProcessor(0, ReferenceStore(), settings())
    res = run(proc, [rec("impressions", imp("a", 0, req="r1")), rec("clicks", clk("c", 1_000, req="r1")),
                     rec("impressions", imp("b", 2_000, item=11))])
    (first,) = samples_of(res)
    assert first.sample_id == "a" and first.label == 1
    assert first.hist_item_ids == []  # its own click is not in its history
    assert first.counters["user_clicks"] == 0 and first.counters["item_clicks"] == 0
    res = run(proc, [rec("clicks", clk("x", 2 * W + 3_000, item=99)), rec("impressions", imp("z", 2 * W + 3_000, item=98))])
    (second,) = [s for s in samples_of(res) if s.sample_id == "b"]
    assert second.label == 0
    assert second.hist_item_ids == [10] and second.hist_ts == [T0 + 1_000]
    assert second.counters == {"user_impressions": 1.0, "user_clicks": 1.0, "item_impressions": 0.0,
                               "item_clicks": 0.0}


def test_leakage_with_positives_held_to_the_window_close():
    """The default emits the positive a window later, after more behaviour arrived: its sample
    still holds only what came strictly before its impression."""
    proc = PartitionProcessor(0, ReferenceStore(), settings("window_close"))
    res = run(proc, [rec("impressions", imp("a", 0, req="r1")), rec("clicks", clk("c", 1_000, req="r1")),
                     rec("impressions", imp("b", 2_000, item=11)), rec("clicks", clk("c2", 3_000, item=11))])
    assert samples_of(res) == []  # held: no window has closed
    res = run(proc, [rec("clicks", clk("x", 2 * W + 3_000, item=99)), rec("impressions", imp("z", 2 * W + 3_000, item=98))])
    first, second = samples_of(res)  # in impression-time order
    assert (first.sample_id, first.label, second.sample_id, second.label) == ("a", 1, "b", 1)
    assert first.hist_item_ids == [] and first.counters["user_clicks"] == 0
    assert second.hist_item_ids == [10] and second.hist_ts == [T0 + 1_000]
    assert second.counters["user_clicks"] == 1.0


def test_same_timestamp_events_never_see_each_other():
    proc = PartitionProcessor(0, ReferenceStore(), settings())
    recs = []
    for k in range(4):  # four ratings at one timestamp, each also clicked at that timestamp
        recs += [rec("impressions", imp(f"i{k}", 0, item=k, req=f"r{k}")), rec("clicks", clk(f"c{k}", 0, item=k, req=f"r{k}"))]
    res = run(proc, recs)
    got = samples_of(res)
    assert sorted(s.sample_id for s in got) == ["i0", "i1", "i2", "i3"]
    for s in got:
        assert s.label == 1 and s.hist_item_ids == []
        assert all(v == 0 for v in s.counters.values()), s.counters


def test_bad_messages_are_dead_lettered_and_good_ones_still_flow():
    proc = PartitionProcessor(0, ReferenceStore(), settings())
    bad = [Record("p.impressions", 0, 1, b"k", b"{not json"), Record("p.clicks", 0, 2, None, b"\xff\xfe"),
           Record("p.impressions", 0, 3, b"k", json.dumps({"event_id": "x", "user_id": -5}).encode()),
           Record("p.clicks", 0, 4, b"k", None)]
    res = run(proc, [rec("impressions", imp("a", 0, req="r")), *bad, rec("clicks", clk("c", 5, req="r")),
                     rec("impressions", imp("b", 10, user=2))])  # moves the merge past the click
    dead = [decode_dead_letter(v) for t, _, v in res.messages if t == "p.dead-letters"]
    assert [d.offset for d in dead] == [1, 2, 3, 4]
    assert dead[0].original == b"{not json" and dead[0].reason.startswith("malformed")
    assert dead[1].reason.startswith("utf8") and dead[3].reason.startswith("empty")
    assert [s.sample_id for s in samples_of(res)] == ["a"]


def test_crash_before_commit_reemits_the_same_samples_and_after_commit_nothing():
    store = ReferenceStore()
    # "b" follows "a" and its click for the same user and item: its counters count them
    batch = [rec("impressions", imp("a", 0, req="r")), rec("clicks", clk("c", 5, req="r")),
             rec("impressions", imp("b", 10, req="r2")), rec("clicks", clk("d", 12, req="r2")),
             rec("impressions", imp("e", 20, user=2))]
    proc = PartitionProcessor(0, store, settings())
    first = proc.process(batch)  # produced, then the process dies before commit
    proc = PartitionProcessor(0, store, settings())  # restart from what was persisted
    again = run(proc, batch)
    assert [s.sample_id for s in samples_of(first)] == ["a", "b"]
    b = samples_of(first)[1]
    assert b.counters == {"user_impressions": 1.0, "user_clicks": 1.0, "item_impressions": 1.0, "item_clicks": 1.0}
    # the store kept the first attempt's events: nothing may count twice in the redo
    assert samples_of(again) == samples_of(first)
    proc = PartitionProcessor(0, store, settings())  # crash after commit: redelivery is a no-op
    assert samples_of(run(proc, batch)) == []


def test_events_waiting_for_the_other_input_survive_a_restart_and_count_in_time_order():
    store = ReferenceStore()
    proc = PartitionProcessor(0, store, settings())
    # Impressions read first; no click fetched yet: everything waits in the merge ...
    res = run(proc, [rec("impressions", imp("a", 0, req="r")), rec("impressions", imp("b", 1_000, item=11)),
                     rec("impressions", imp("c", 2_000, item=12))])
    assert res.messages == [] and len(proc.merger) == 3
    assert any(k.startswith(b"merge/") for k in store.extra)  # ... persisted with the join state
    # The process dies; offsets were committed. The restarted processor still has them.
    proc = PartitionProcessor(0, store, settings())
    assert len(proc.merger) == 3
    res = run(proc, [rec("clicks", clk("ca", 500, req="r")), rec("clicks", clk("other", 3_000, user=2, item=5))])
    (a,) = samples_of(res)
    assert a.sample_id == "a" and a.label == 1
    later = run(proc, [rec("impressions", imp("d", 2 * W + 5_000, user=3)), rec("clicks", clk("x", 2 * W + 5_000, user=3))])
    got = {s.sample_id: s for s in samples_of(later)}
    # b and c were joined after the click at 500 although it was read after them
    assert got["b"].counters["user_clicks"] == 1 and got["b"].hist_item_ids == [10]
    assert got["c"].counters["user_clicks"] == 1 and got["c"].counters["user_impressions"] == 2
    assert len(proc.merger) == 0 and not any(k.startswith(b"merge/m/") for k in store.extra)


def test_gauges_show_what_the_join_holds_after_each_commit():
    from prometheus_client import REGISTRY

    def held():
        return {name: REGISTRY.get_sample_value(f"dmrstream_streamer_{name}", {"partition": "7"})
                for name in ("pending_impressions", "finished_impressions", "early_clicks")}

    proc = PartitionProcessor(7, ReferenceStore(), settings())
    # a (clicked: finished), b and x (waiting), a click no impression claims (held until the
    # watermark passes it; x moves the impressions to its time, so the merge releases it)
    run(proc, [rec("impressions", imp("a", 0, req="r")), rec("clicks", clk("c", 5, req="r")),
               rec("impressions", imp("b", 10, user=2)), rec("clicks", clk("orphan", 20, user=3)),
               rec("impressions", imp("x", 20, user=6))])
    assert held() == {"pending_impressions": 2, "finished_impressions": 1, "early_clicks": 1}
    # both inputs past 2 W: b and x labelled 0, all three forgotten, the held click dropped; z clicked
    run(proc, [rec("impressions", imp("z", 3 * W, user=4)), rec("clicks", clk("zc", 3 * W, user=4))])
    assert held() == {"pending_impressions": 0, "finished_impressions": 1, "early_clicks": 0}


def test_late_horizon_setting_bounds_how_long_labelled_impressions_are_remembered():
    def after_late_click(late_horizon_ms):
        s = load_settings(overrides={"join.attribution_window_ms": W, "topics.prefix": "p.",
                                     "join.late_horizon_ms": late_horizon_ms, "join.emit_corrections": True})
        proc = PartitionProcessor(0, ReferenceStore(), s)
        run(proc, [rec("impressions", imp("a", 0, req="r"))])
        # both inputs at 1.5 W: "a" labelled 0; the click for it, read only now, is late by 0.5 W
        run(proc, [rec("impressions", imp("b", W + W // 2, user=2)), rec("clicks", clk("x", W + W // 2, user=3))])
        late = run(proc, [rec("clicks", clk("c", 10, req="r"))])
        return sorted(proc.join.done), [s.sample_id for s in samples_of(late)]

    # by default (W) "a" is remembered: its late click is recognised and corrected
    assert after_late_click(None) == (["a"], ["a#corr"])
    # a horizon of W / 4 forgot it at 1.25 W: the click is an ordinary behaviour, nothing emitted
    assert after_late_click(W // 4) == ([], [])


def test_a_click_labels_the_impression_of_its_item_in_a_request_of_several():
    proc = PartitionProcessor(0, ReferenceStore(), settings("window_close"))
    shown = [rec("impressions", imp(f"r1-{item}", 0, item=item, req="r1")) for item in (10, 11, 12)]
    run(proc, [*shown, rec("clicks", clk("c", 2_000, item=11, req="r1"))])
    res = run(proc, [rec("impressions", imp("z", 2 * W, user=2)), rec("clicks", clk("zc", 2 * W, user=3))])
    assert {s.sample_id: s.label for s in samples_of(res)} == {"r1-10": 0, "r1-11": 1, "r1-12": 0}
