"""Whole fetches from faust's consumer to one batch loop, with faust's offset tracking and acks.

faust hands every message to the streams one by one: conductor (key/value decoding, an ``Event``),
the channel's queue, the stream's iterator with its sensors, ``take_events``' buffer, then an ack
per event. That per-message path costs ~70 us here (bench/streamer.py's faust floor). A topic
registered here skips it: the streamer's consumer (``streamer/faust_transport.py``) puts each
fetch's messages of that topic into this buffer as one list, and the worker's loop takes them
in batches.

What stays faust's, unchanged: the subscription (the topics are added to the app's conductor),
fetching, the read offsets and gaps, flow control and consumer generations on a rebalance, and
the offsets it commits. A message taken from here is tracked as pending (``track_message``) and
committed only once :meth:`FetchBatches.ack` acks it (``Consumer.ack``), so at-least-once holds
as with faust's streams: on a rebalance faust suspends the flow, drops what is buffered here
(:meth:`clear`, through ``app.flow_control``) and waits until every taken message is acked
before it commits and revokes; messages of an older generation are never taken; what was
dropped is fetched again from the committed offsets.

faust's sensors (its ``Monitor``) are not called per message for these topics (that was ~3 % of
the worker): the streamer's own metrics count what it consumes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Iterable


class FetchBatches:
    """Messages of ``topics`` as whole fetches, for one batch loop (see the module docstring).

    At most ``max_buffered`` messages wait here; the consumer stops fetching meanwhile (as a
    full stream buffer stops it in faust)."""

    def __init__(self, app: Any, topics: Iterable[Any], max_buffered: int = 20_000):
        self.app = app
        self.max_buffered = max_buffered
        self._fetches: deque[list] = deque()
        self._buffered = 0
        self._changed = asyncio.Event()  # set by put and take
        self.topics: set[str] = set()
        for topic in topics:
            app.topics.add(topic)  # subscribed and acked by faust as an agent's topic is
            self.topics.update(topic.topics)
        sinks = getattr(app.transport, "fetch_batches", None)
        if sinks is None:
            raise TypeError("the app's transport does not hand over whole fetches "
                            "(streamer.faust_transport.EagerHandOverTransport does)")
        for name in self.topics:
            sinks[name] = self
        app.flow_control.manage_queue(self)  # cleared with faust's own buffers on a rebalance

    # -- the consumer's side ---------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Messages waiting here."""
        return self._buffered

    def full(self) -> bool:
        return self._buffered >= self.max_buffered

    def put(self, messages: list) -> None:
        """A fetch's messages of these topics (consumer order), not tracked yet."""
        self._fetches.append(messages)
        self._buffered += len(messages)
        self._changed.set()

    async def wait_room(self) -> None:
        while self.full():
            self._changed.clear()
            await self._changed.wait()

    def clear(self) -> None:
        """Drop what is buffered (faust's flow control on a rebalance: fetched again later)."""
        self._fetches.clear()
        self._buffered = 0
        self._changed.set()

    # -- the batch loop's side ---------------------------------------------------------------------
    async def take(self, max_: int, within: float) -> list:
        """The next batch: up to ``max_`` messages, waiting up to ``within`` seconds after the
        first arrives for more. Every message returned belongs to the current consumer
        generation and is tracked as pending until :meth:`ack`."""
        app, loop = self.app, asyncio.get_running_loop()
        while True:
            await app.flow_control.acquire()  # as FlowControlQueue.get: not during a rebalance
            if not self._fetches:
                self._changed.clear()
                await self._changed.wait()
                continue
            deadline = loop.time() + within
            while self._buffered < max_ and (remaining := deadline - loop.time()) > 0:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            if not app.flow_control.is_active() or not self._fetches:
                continue  # a rebalance began meanwhile (and cleared the buffer)
            batch = self._pop(max_)
            generation = app.consumer_generation_id
            taken = [m for m in batch if m.generation_id == generation]  # else fetched before a rebalance
            if taken:
                # Consumer.track_message without its per-message sensor call: pending until acked.
                app.consumer.unacked.update(taken)
                return taken

    def _pop(self, max_: int) -> list:
        batch: list = []
        fetches = self._fetches
        while fetches and len(batch) < max_:
            first = fetches[0]
            room = max_ - len(batch)
            if len(first) <= room:
                batch += fetches.popleft()
            else:
                batch += first[:room]
                fetches[0] = first[room:]
        self._buffered -= len(batch)
        self._changed.set()  # room for the consumer
        return batch

    def ack(self, messages: list) -> None:
        """The batch is done: its offsets may be committed (faust's ``Consumer.ack``)."""
        ack = self.app.consumer.ack
        for message in messages:
            ack(message)
