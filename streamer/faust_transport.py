"""faust's aiokafka transport with a cheaper per-message hand-over from the fetcher to the streams.

faust's ``Consumer._drain_messages`` hands every fetched message to the streams with
``await wait_first(callback(message), suspend_flow.wait())``: two tasks and an ``asyncio.wait``
per message, so that a rebalance (``suspend_flow``) can abandon a hand-over blocked on a full
stream buffer. That race costs as much as everything else faust does per message: an agent
that does nothing consumes ~7,000 events/s here with it, ~14,000 with this transport
(bench/streamer.py measures both, ``faust_floor``). Almost every hand-over completes at once (the buffer has room), so this
consumer first runs the callback's coroutine one step in place; only when it would wait does it
race the rest of it against ``suspend_flow`` exactly as faust does. Same behaviour, no task for
the common case.

A second change: messages of a topic registered in ``transport.fetch_batches`` (the streamer's
inputs, see ``streamer/faust_batches.py``) skip the per-message hand-over altogether; each fetch's
messages of such a topic go to its buffer as one list after the fetch (read offsets and gaps
kept as faust keeps them). That takes faust's floor from ~14,000 to ~140,000 events/s here.

The method below is faust-streaming 0.15.3's ``_drain_messages`` with these two changes (the pin
in pyproject/requirements.lock; tests/unit/test_faust_transport.py fails when faust's own method
changes, so that this copy is reviewed on an upgrade).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Generator

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver


class _Rest:
    """Awaitable continuing a coroutine that was stepped once and yielded ``yielded``: the rest
    of it runs in whatever task awaits this (values and exceptions passed through)."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine, yielded: Any):
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                value = yield yielded
            except BaseException as exc:  # e.g. the task is cancelled: into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(value)
                except StopIteration as stop:
                    return stop.value


class EagerHandOverConsumer(aiokafka_driver.Consumer):
    """faust's aiokafka consumer, handing messages over without a task when nothing waits."""

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover (the worker runs it)
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        sinks = self.transport.fetch_batches
        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    fetched: dict = {}  # FetchBatches -> this fetch's messages for it
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset:
                                if acks_enabled_for(message.topic):
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            sink = sinks.get(message.topic) if sinks else None
                            if sink is not None:  # change 2: a whole-fetch topic
                                batch = fetched.get(sink)
                                if batch is None:
                                    fetched[sink] = [message]
                                else:
                                    batch.append(message)
                                set_read_offset(tp, offset)
                                continue
                            # change 1: step the hand-over in place first
                            handover = callback(message)
                            try:
                                yielded = handover.send(None)
                            except StopIteration:
                                pass  # delivered without waiting: no task, no race
                            else:
                                await self.wait_first(_Rest(handover, yielded), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                    for sink, batch in fetched.items():
                        await self._hand_over_fetch(sink, batch)
                    unset_flag(flag_consumer_fetching)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


    async def _hand_over_fetch(self, sink: Any, batch: list) -> None:
        """Give a fetch's messages of a whole-fetch topic to its buffer; when that is full, wait
        for room racing a rebalance, as faust's per-message hand-over does (a rebalance drops
        the fetch: it is fetched again from the committed offsets)."""
        if sink.full():
            await self.wait_first(sink.wait_room(), self.suspend_flow.wait())
        if self.suspend_flow.is_set() or not self.app.flow_control.is_active():
            return
        sink.put(batch)


class EagerHandOverTransport(aiokafka_driver.Transport):
    """faust's aiokafka transport with :class:`EagerHandOverConsumer`; ``fetch_batches`` maps
    a topic to the :class:`~streamer.faust_batches.FetchBatches` that takes its whole fetches."""

    Consumer = EagerHandOverConsumer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_batches: dict[str, Any] = {}
