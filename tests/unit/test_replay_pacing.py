"""Pacing arithmetic, the send loop (limit, counts, keys) and the file sink."""

from __future__ import annotations

import pytest

from dmrstream.contracts import Click, Impression
from replay.pacing import Pacer, parse_speed
from replay.runner import run
from replay.sinks import ListSink


class FakeClock:
    """A clock the test advances by itself (sleeping advances it), so pacing is exact."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_parse_speed():
    assert parse_speed("max") is None and parse_speed(None) is None
    assert parse_speed("60") == 60.0 and parse_speed("60x") == 60.0
    with pytest.raises(ValueError):
        parse_speed("0")


def test_speed_maps_event_time_to_wall_time():
    clock = FakeClock()
    p = Pacer(speed=60, clock=clock, sleep=clock.sleep)
    assert p.wait(1_000_000, 0) == 0.0  # the first event anchors the clocks
    p.wait(1_000_000 + 60_000, 1)  # a minute of event time later: one second at 60x
    assert clock.now == pytest.approx(101.0)
    clock.now += 5.0  # the sink was slow: late events are not delayed further
    assert p.wait(1_000_000 + 120_000, 2) == 0.0


def test_rate_caps_events_per_second_and_both_take_the_slower():
    clock = FakeClock()
    p = Pacer(rate=1000, clock=clock, sleep=clock.sleep)
    for n in range(5000):
        p.wait(0, n)
    assert clock.now == pytest.approx(104.999, abs=0.002)
    both = Pacer(speed=1, rate=10)
    assert both.due(ts_ms=5_000, n_sent=10) == 5.0 and both.due(ts_ms=100, n_sent=10) == 1.0


def test_unpaced_never_sleeps():
    assert not Pacer().active and Pacer().delay(10**12, 10**9) == 0.0


def events(n):
    for i in range(n):
        yield Impression(event_id=f"{i}:i", user_id=i % 3, item_id=i, category_id=0, ts=1_700_000_000_000 + i,
                         sampled=i % 2 == 1)
        yield Click(event_id=f"{i}:c", user_id=i % 3, item_id=i, category_id=0, ts=1_700_000_000_000 + i)


def test_run_counts_keys_by_user_and_stops_at_limit():
    sink = ListSink()
    s = run(events(100), sink, limit=51)
    assert (s.events, s.impressions, s.clicks, s.sampled) == (51, 26, 25, 13)
    assert [t for t, _, _ in sink.sent[:2]] == ["impressions", "clicks"]
    assert [k for _, k, _ in sink.sent[:6:2]] == [b"0", b"1", b"2"]
    assert s.bytes == sum(len(v) for _, _, v in sink.sent)
    assert (s.first_ts, s.last_ts) == (1_700_000_000_000, 1_700_000_000_025)


def test_run_progress_callback():
    seen = []
    run(events(10), ListSink(), progress=lambda s: seen.append(s.events), progress_every=4)
    assert seen == [4, 8, 12, 16, 20, 20]


def test_sink_is_told_before_the_stream_pauses():
    clock = FakeClock()
    pauses = []
    p = Pacer(speed=1, clock=clock, sleep=clock.sleep)
    p.wait(0, 0, pauses.append)
    p.wait(0, 1, pauses.append)  # due now: no pause, no call
    p.wait(2_500, 2, pauses.append)
    assert pauses == [pytest.approx(2.5)] and clock.slept == pauses
