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


def test_the_copied_faust_method_is_unchanged_upstream():
    src = inspect.getsource(Consumer._drain_messages)
    assert hashlib.sha256(src.encode()).hexdigest() == FAUST_DRAIN_SHA256
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
