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
