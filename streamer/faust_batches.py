"""Whole fetches from faust's consumer to one batch loop, with faust's offset tracking and acks.

faust hands every message to the streams one by one: conductor (key/value decoding, an ``Event``),
the channel's queue, the stream's iterator with its sensors, ``take_events``' buffer, then an ack
per event. That per-message path costs ~70 us here (bench/streamer.py's faust floor). A topic
registered here skips it: the streamer's consumer (``streamer/faust_transport.py``) puts each
fetch's records of that topic into this buffer as one :class:`FetchedRun` per partition (aiokafka's
records: no faust message object per record), and the worker's loop takes them in batches.

What stays faust's, unchanged: the subscription (the topics are added to the app's conductor),
fetching, the read offsets and gaps, flow control and consumer generations on a rebalance, and
the offsets it commits. A batch taken from here is tracked as pending (``track_message``'s work,
one entry per batch) and its offsets are committed only once :meth:`FetchBatches.ack` acks it
(``Consumer.ack``'s bookkeeping, for the whole batch at once), so at-least-once holds
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
from operator import attrgetter
from typing import Any, Iterable

from faust.types.tuples import ack_lock
from mode.utils.futures import notify


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

    def put(self, runs: list["FetchedRun"]) -> None:
        """A fetch's records of these topics, one run per partition, not tracked yet."""
        self._fetches.extend(runs)
        self._buffered += sum(len(run.records) for run in runs)
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
        """The next batch: up to ``max_`` records, waiting up to ``within`` seconds after the
        first arrives for more. Every record returned was fetched in the current consumer
        generation; the batch is tracked as pending until :meth:`ack`."""
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
            generation = app.consumer_generation_id
            runs = [run for run in self._pop(max_) if run.generation_id == generation]  # else fetched before a rebalance
            if runs:
                taken = TakenBatch()
                for run in runs:
                    taken += run.records
                taken.runs = runs
                # Consumer.track_message's work, once per batch: one entry stands for the batch in
                # the consumer's set of unacked messages (what a rebalance waits to see empty).
                taken.pending = PendingBatch(len(taken))
                app.consumer.unacked.add(taken.pending)
                return taken

    def _pop(self, max_: int) -> list["FetchedRun"]:
        """Runs of up to ``max_`` records in all, in buffer order (the last one split if need be)."""
        runs: list[FetchedRun] = []
        fetches, room = self._fetches, max_
        while fetches and room > 0:
            first = fetches[0]
            if len(first.records) <= room:
                runs.append(fetches.popleft())
            else:
                runs.append(FetchedRun(first.tp, first.generation_id, first.records[:room]))
                fetches[0] = FetchedRun(first.tp, first.generation_id, first.records[room:])
            room -= len(runs[-1].records)
        self._buffered -= max_ - room
        self._changed.set()  # room for the consumer
        return runs

    def ack(self, batch: "TakenBatch") -> None:
        """The batch (from :meth:`take`) is done: its offsets may be committed. ``Consumer.ack``'s
        bookkeeping for the whole batch at once, under faust's ack lock: each offset not acked yet
        and not below the committed one is recorded for its partition (faust commits from these),
        then the batch's entry leaves the unacked set and a rebalance waiting for it is woken. A
        batch is acked once."""
        pending, consumer = batch.pending, self.app.consumer
        acks_enabled_for = self.app.topics.acks_enabled_for
        with ack_lock:
            if pending.acked:
                return
            pending.acked = True
            for run in batch.runs:
                tp = run.tp
                if not acks_enabled_for(tp.topic):
                    continue
                committed = consumer._committed_offset[tp]
                acked_index = consumer._acked_index[tp]
                new = [o for o in map(_OFFSET, run.records) if (committed is None or o >= committed) and o not in acked_index]
                acked_index.update(new)
                consumer._acked[tp].extend(new)
                consumer._n_acked += len(new)
            consumer.unacked.discard(pending)
            notify(consumer._waiting_for_ack)


class PendingBatch:
    """Stands for a taken batch in faust's set of unacked messages: faust only tests that set for
    emptiness (``Consumer.wait_empty``) and reads ``acked`` and ``refcount`` of its entries."""

    __slots__ = ("acked", "refcount", "__weakref__")  # the set is a WeakSet

    def __init__(self, messages: int):
        self.acked = False
        self.refcount = messages


class TakenBatch(list):
    """A batch from :meth:`FetchBatches.take`: its records, the runs they came in, and its entry
    in the unacked set."""

    __slots__ = ("runs", "pending")


class FetchedRun:
    """Records of one partition from one fetch, in offset order, and the consumer generation
    they were fetched in."""

    __slots__ = ("tp", "generation_id", "records")

    def __init__(self, tp: Any, generation_id: int, records: list):
        self.tp, self.generation_id, self.records = tp, generation_id, records


_OFFSET = attrgetter("offset")
