"""streamer/faust_transport.py: the eager hand-over's continuation and the guard on the faust
method it copies. (Its behaviour under rebalances and SIGKILLs is exercised by the streamer's
integration and fault tests, which run every worker on this transport.)"""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import pytest
from faust.transport.consumer import Consumer

from streamer.faust_transport import EagerHandOverConsumer, EagerHandOverTransport, _Rest

# sha256 of faust-streaming 0.15.3's Consumer._drain_messages source: when faust changes it,
# streamer/faust_transport.py's copy must be reviewed against the new one (then update this).
FAUST_DRAIN_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
# ... and of its Consumer.getmany, copied in two halves (_fetch, _messages) and per partition
# (_whole_fetch_runs).
FAUST_GETMANY_SHA256 = "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e"


def test_the_copied_faust_method_is_unchanged_upstream():
    src = inspect.getsource(Consumer._drain_messages)
    assert hashlib.sha256(src.encode()).hexdigest() == FAUST_DRAIN_SHA256
    assert hashlib.sha256(inspect.getsource(Consumer.getmany).encode()).hexdigest() == FAUST_GETMANY_SHA256
    assert EagerHandOverTransport.Consumer is EagerHandOverConsumer
    assert issubclass(EagerHandOverConsumer, Consumer)


def test_the_streamer_app_consumes_through_it(tmp_path):
    """Without this transport the streamer still works, only at half faust's rate: nothing but
    this check (and the bench) would notice."""
    from dmrstream.settings import load_settings
    from streamer.app import create_app, faust_app

    s = load_settings(overrides={"state_dir": str(tmp_path), "kafka.bootstrap_servers": "127.0.0.1:9"})
    app = create_app(s)
    assert type(app.transport) is EagerHandOverTransport
    assert app.transport.Consumer is EagerHandOverConsumer
    assert type(faust_app(s, "stock", eager_hand_over=False).transport) is not EagerHandOverTransport


def _step_then_rest(coro):
    """What the consumer does: one step in place, the rest (if any) awaited in a task."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return None, stop.value
    return _Rest(coro, yielded), None


def test_a_hand_over_that_does_not_wait_completes_in_place():
    log = []

    async def deliver():
        log.append("delivered")
        return 7

    async def main():
        rest, value = _step_then_rest(deliver())
        assert rest is None and value == 7 and log == ["delivered"]

    asyncio.run(main())


def test_a_hand_over_that_waits_continues_in_a_task_with_values_and_errors():
    async def main():
        gate = asyncio.get_running_loop().create_future()
        seen = []

        async def deliver():
            seen.append(await gate)  # blocks: e.g. a full stream buffer
            await asyncio.sleep(0)  # a bare yield too
            return "done"

        rest, _ = _step_then_rest(deliver())
        assert rest is not None and seen == []
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        gate.set_result("value")
        assert await task == "done" and seen == ["value"]

        gate2 = asyncio.get_running_loop().create_future()

        async def failing():
            await gate2
            raise ValueError("refused")

        rest, _ = _step_then_rest(failing())
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        gate2.set_result(None)
        with pytest.raises(ValueError, match="refused"):
            await task

    asyncio.run(main())


def test_cancelling_the_wait_reaches_the_hand_over():
    """A rebalance abandons a blocked hand-over (faust's wait_first cancels it): the cancellation
    must reach the coroutine itself, so that its cleanup runs."""
    async def main():
        cleaned = []

        async def deliver():
            try:
                await asyncio.get_running_loop().create_future()  # never done
            finally:
                cleaned.append(True)

        rest, _ = _step_then_rest(deliver())
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    asyncio.run(main())


def test_the_streamer_app_takes_its_inputs_as_whole_fetches(tmp_path):
    """The streamer's inputs go through FetchBatches, not faust's per-message streams: without it
    the worker would run at a tenth of this path's rate and only the bench would notice."""
    from dmrstream.settings import load_settings
    from streamer.app import create_app
    from streamer.faust_batches import FetchBatches

    s = load_settings(overrides={"state_dir": str(tmp_path), "kafka.bootstrap_servers": "127.0.0.1:9",
                                 "topics.prefix": "fx."})
    app = create_app(s)
    sinks = app.transport.fetch_batches
    assert set(sinks) == {"fx.impressions", "fx.clicks"}
    assert all(type(v) is FetchBatches for v in sinks.values())
    subscribed = {name for topic in app.topics for name in topic.topics}
    assert {"fx.impressions", "fx.clicks"} <= subscribed  # faust still subscribes and acks them


def test_a_fetch_is_dropped_not_handed_over_when_a_rebalance_begins():
    """A fetch waiting for room races faust's suspend_flow, as a per-message hand-over does; once
    the flow is suspended nothing reaches the buffer (it is fetched again after the rebalance)."""
    from types import SimpleNamespace

    from mode.utils.locks import Event
    from mode.utils.queues import FlowControlEvent

    class Sink:
        def __init__(self, full):
            self.is_full, self.got = full, []

        def full(self):
            return self.is_full

        async def wait_room(self):
            await asyncio.get_running_loop().create_future()  # never: only the rebalance ends it

        def put(self, batch):
            self.got.append(batch)

    async def wait_first(*coros):
        done, pending = await asyncio.wait([asyncio.ensure_future(c) for c in coros],
                                           return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()

    async def main():
        consumer = SimpleNamespace(suspend_flow=Event(), wait_first=wait_first,
                                   app=SimpleNamespace(flow_control=FlowControlEvent(initially_suspended=False)))
        hand_over = EagerHandOverConsumer._hand_over_fetch
        room = Sink(full=False)
        await hand_over(consumer, room, [1, 2])
        assert room.got == [[1, 2]]
        full = Sink(full=True)
        task = asyncio.ensure_future(hand_over(consumer, full, [3]))
        await asyncio.sleep(0.01)
        assert not task.done()
        consumer.suspend_flow.set()  # a rebalance begins
        await asyncio.wait_for(task, 1)
        assert full.got == []

    asyncio.run(main())


class _Rec:
    def __init__(self, topic, partition, offset):
        self.topic, self.partition, self.offset = topic, partition, offset


def _whole_fetch_consumer(read_offsets, active=None, generation=1):
    """What _whole_fetch_runs reads of faust's consumer, with the calls it makes recorded."""
    from collections import defaultdict
    from types import SimpleNamespace

    calls = {"gaps": [], "end_offsets": []}

    async def add_gap(tp, offset_from, offset_to):
        calls["gaps"].append((tp.topic, tp.partition, offset_from, offset_to))

    sink = object()
    c = SimpleNamespace(
        transport=SimpleNamespace(fetch_batches={"t.imp": sink, "t.noack": sink}),
        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda t: t != "t.noack"),
                            consumer_generation_id=generation,
                            monitor=SimpleNamespace(track_tp_end_offset=lambda tp, hw: calls["end_offsets"].append((tp, hw)))),
        _read_offset=defaultdict(lambda: None, read_offsets), flow_active=True, _buffered_partitions=set(),
        highwater=lambda tp: 100, _add_gap=add_gap, _commit_every=None, _n_acked=0)
    return c, sink, calls


def test_whole_fetch_runs_keep_faust_read_offsets_and_gaps_per_partition():
    """Per partition, what faust's getmany and per-message loop do per message: records read
    before are dropped, skipped offsets become gaps (not on topics without acks; not before a
    partition's first read, as faust), the read offset moves to the last record, the end offset
    is reported; partitions not active are left alone."""
    from faust.types import TP

    tps = [TP("t.imp", p) for p in range(5)] + [TP("t.noack", 0)]
    records = {
        tps[0]: [_Rec("t.imp", 0, o) for o in (5, 6, 9)],  # first read: no gap before 5, 7-8 skipped
        tps[1]: [_Rec("t.imp", 1, o) for o in (8, 9, 10, 11, 13)],  # read up to 10 before
        tps[2]: [_Rec("t.imp", 2, o) for o in (6, 7)],  # read up to 3: 4-5 skipped
        tps[3]: [_Rec("t.imp", 3, o) for o in (0, 1)],  # not an active partition
        tps[4]: [_Rec("t.imp", 4, o) for o in (0, 2)],  # read offset 0 is "none" to faust's gap check
        tps[5]: [_Rec("t.noack", 0, o) for o in (4, 9)],
    }
    c, sink, calls = _whole_fetch_consumer({tps[1]: 10, tps[2]: 3, tps[3]: 0})
    active = set(tps) - {tps[3]}
    fetched = asyncio.run(EagerHandOverConsumer._whole_fetch_runs(c, records, active, 1))
    runs = {run.tp: [r.offset for r in run.records] for run in fetched[sink]}
    assert list(fetched) == [sink] and all(run.generation_id == 1 for run in fetched[sink])
    assert runs == {tps[0]: [5, 6, 9], tps[1]: [10, 11, 13], tps[2]: [6, 7], tps[4]: [0, 2], tps[5]: [4, 9]}
    assert calls["gaps"] == [("t.imp", 0, 7, 9), ("t.imp", 1, 12, 13), ("t.imp", 2, 4, 6)]
    assert {tp: c._read_offset[tp] for tp in tps} == {tps[0]: 9, tps[1]: 13, tps[2]: 7, tps[3]: 0, tps[4]: 2, tps[5]: 9}
    assert [tp for tp, _ in calls["end_offsets"]] == [tps[0], tps[1], tps[2], tps[4], tps[5]]


def test_whole_fetch_runs_take_nothing_once_a_rebalance_began():
    from faust.types import TP

    tp = TP("t.imp", 0)
    c, _, calls = _whole_fetch_consumer({}, generation=2)  # the generation moved on after the fetch
    assert asyncio.run(EagerHandOverConsumer._whole_fetch_runs(c, {tp: [_Rec("t.imp", 0, 1)]}, None, 1)) == {}
    c, _, calls = _whole_fetch_consumer({})
    c.flow_active = False  # the flow was suspended
    assert asyncio.run(EagerHandOverConsumer._whole_fetch_runs(c, {tp: [_Rec("t.imp", 0, 1)]}, None, 1)) == {}
    assert c._read_offset[tp] is None and calls["gaps"] == []
