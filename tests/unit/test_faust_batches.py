"""streamer/faust_batches.py without a broker: batches of whole fetches, only the current consumer
generation, tracked until acked through faust's consumer bookkeeping, dropped on a rebalance."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from itertools import groupby
from types import SimpleNamespace
from weakref import WeakSet

import pytest
from faust.transport.consumer import Consumer
from faust.types import TP
from mode.utils.queues import FlowControlEvent

from streamer.faust_batches import FetchBatches, FetchedRun

# sha256 of faust-streaming 0.15.3's Consumer.track_message, Consumer.unacked and Consumer.ack
# sources: FetchBatches does track_message's work itself (one entry per batch in the live
# ``unacked`` set, no per-message sensor call) and ack's bookkeeping for a whole batch; when faust
# changes any of them, review FetchBatches.take and .ack (then update).
FAUST_TRACK_SHA256 = "217d7f1399a4cd8e15a43a64ecf50413b9b738058e5433e057f0dc3927a3fc03"
FAUST_UNACKED_SHA256 = "7b6ebac5ffdcb6b7ce6306b6198cf1b6dd114e01da9baa76c1dd51ce67a2058a"
FAUST_ACK_SHA256 = "5fcf41cf45153475de3790dc56fec1b83335956dc8b3bf7ff6bbb2b57627f03f"


class Topics(set):
    def acks_enabled_for(self, topic):
        return topic != "t.noack"


class FakeConsumer:
    """The state faust's Consumer keeps for acks, as its __init__ builds it; ``ack`` is faust's own."""

    def __init__(self, app):
        self.app = app
        self._unacked_messages = WeakSet()
        self._committed_offset = defaultdict(lambda: None)
        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._n_acked = 0
        self._waiting_for_ack = None

    unacked = Consumer.unacked
    ack = Consumer.ack


class Msg:
    """A record as the batches read it (topic, offset) with what faust's own ack reads too."""

    __slots__ = ("topic", "tp", "offset", "generation_id", "acked", "__weakref__")

    def __init__(self, topic, partition, offset, generation=1):
        self.topic, self.tp, self.offset = topic, TP(topic, partition), offset
        self.generation_id, self.acked = generation, False


def make_app():
    app = SimpleNamespace(consumer_generation_id=1, topics=Topics(),
                          transport=SimpleNamespace(fetch_batches={}),
                          flow_control=FlowControlEvent(initially_suspended=False))
    app.consumer = FakeConsumer(app)
    return app


def msgs(offsets, generation=1, topic="t.imp", partition=0):
    """One fetch of one partition, as the consumer puts it."""
    return [FetchedRun(TP(topic, partition), generation, [Msg(topic, partition, o, generation) for o in offsets])]


def runs_of(messages):
    """A fetch of several partitions: a run per stretch of one partition."""
    return [FetchedRun(tp, 1, list(group)) for tp, group in groupby(messages, key=lambda m: m.tp)]


def acked(app, topic="t.imp", partition=0):
    return app.consumer._acked[TP(topic, partition)]


class Topic:
    topics = ("t.imp", "t.clk")


def batches(app, **kw):
    return FetchBatches(app, [Topic()], **kw)


def test_what_it_does_in_place_of_faust_is_unchanged_upstream():
    import hashlib
    import inspect

    from faust.transport.consumer import Consumer

    assert hashlib.sha256(inspect.getsource(Consumer.track_message).encode()).hexdigest() == FAUST_TRACK_SHA256
    assert hashlib.sha256(inspect.getsource(Consumer.unacked.fget).encode()).hexdigest() == FAUST_UNACKED_SHA256
    assert hashlib.sha256(inspect.getsource(Consumer.ack).encode()).hexdigest() == FAUST_ACK_SHA256


def test_registers_its_topics_with_faust_and_the_transport():
    app = make_app()
    b = batches(app)
    assert app.transport.fetch_batches == {"t.imp": b, "t.clk": b}
    assert len(app.topics) == 1  # the topic object: faust subscribes to it and acks it
    with pytest.raises(TypeError):
        FetchBatches(SimpleNamespace(topics=set(), transport=object()), [])


def test_take_splits_and_joins_fetches_tracks_and_acks_through_faust():
    async def main():
        app = make_app()
        b = batches(app)
        b.put(msgs(range(0, 5)))
        b.put(msgs(range(5, 8)))
        first = await b.take(4, within=0)
        assert [m.offset for m in first] == [0, 1, 2, 3]
        rest = await b.take(100, within=0)
        assert [m.offset for m in rest] == [4, 5, 6, 7]
        assert len(app.consumer.unacked) == 2  # one entry per batch taken: a rebalance waits for both
        assert acked(app) == []  # nothing committed before the batch is done
        b.ack(first)
        b.ack(first)  # a repeat acks nothing twice
        assert acked(app) == [0, 1, 2, 3] and app.consumer._n_acked == 4
        assert list(app.consumer.unacked) == [rest.pending]
        b.ack(rest)
        assert acked(app) == list(range(8)) and len(app.consumer.unacked) == 0

    asyncio.run(main())


def test_take_waits_within_for_more_then_returns_what_it_has():
    async def main():
        app = make_app()
        b = batches(app)
        task = asyncio.ensure_future(b.take(10, within=0.2))
        await asyncio.sleep(0.01)
        assert not task.done()  # nothing buffered: waits
        b.put(msgs([0, 1]))
        await asyncio.sleep(0.05)
        b.put(msgs([2]))
        await asyncio.sleep(0.01)
        assert not task.done()  # below max: waits for more until `within` has passed
        assert [m.offset for m in await task] == [0, 1, 2]
        b.put(msgs(range(3, 13)))
        got = await asyncio.wait_for(b.take(10, within=5), 1)  # full: at once
        assert [m.offset for m in got] == list(range(3, 13))

    asyncio.run(main())


def test_messages_of_an_older_generation_are_never_taken_nor_tracked():
    async def main():
        app = make_app()
        b = batches(app)
        b.put(msgs([0, 1], generation=1))
        app.consumer_generation_id = 2  # a rebalance happened after that fetch
        b.put(msgs([7], generation=2))
        got = await b.take(10, within=0)
        assert [m.offset for m in got] == [7] and len(app.consumer.unacked) == 1
        b.ack(got)
        assert acked(app) == [7]

    asyncio.run(main())


def test_a_rebalance_drops_the_buffer_and_take_waits_for_the_flow():
    async def main():
        app = make_app()
        b = batches(app)
        b.put(msgs([0, 1]))
        app.flow_control.suspend()
        task = asyncio.ensure_future(b.take(10, within=0))
        await asyncio.sleep(0.01)
        assert not task.done()  # no batch during a rebalance
        app.flow_control.resume()  # faust clears its managed buffers: this one too
        await asyncio.sleep(0.01)
        assert not task.done() and len(b._fetches) == 0
        b.put(msgs([5]))
        got = await asyncio.wait_for(task, 1)
        assert [m.offset for m in got] == [5]
        b.ack(got)
        assert acked(app) == [5]  # the dropped ones were never tracked: fetched again

    asyncio.run(main())


def test_the_consumer_waits_for_room():
    async def main():
        app = make_app()
        b = batches(app, max_buffered=3)
        b.put(msgs([0, 1, 2]))
        assert b.full()
        waiter = asyncio.ensure_future(b.wait_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await b.take(2, within=0)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())


def test_a_batch_ack_records_what_faust_acking_each_message_records():
    """Over partitions, topics with acks off, offsets below the committed one and repeats: the
    same acked offsets, index and count as faust's own Consumer.ack called per message, and
    every batch leaves the unacked set."""
    rng = random.Random(3)

    async def main():
        ours, faust_app = make_app(), make_app()
        for app in (ours, faust_app):
            app.consumer._committed_offset[TP("t.imp", 1)] = 5
        b = batches(ours)
        stream = [Msg(rng.choice(["t.imp", "t.clk", "t.noack"]), rng.randrange(2), rng.randrange(40))
                  for _ in range(300)]
        for i in range(0, len(stream), 30):
            b.put(runs_of(stream[i:i + 30]))
            batch = await b.take(1000, within=0)
            b.ack(batch)
            for m in stream[i:i + 30]:
                faust_app.consumer.ack(Msg(m.topic, m.tp.partition, m.offset))
        c, f = ours.consumer, faust_app.consumer
        assert {tp: sorted(v) for tp, v in c._acked.items() if v} == {tp: sorted(v) for tp, v in f._acked.items() if v}
        assert dict(c._acked_index) == dict(f._acked_index) and c._n_acked == f._n_acked > 0
        assert len(c.unacked) == 0

    asyncio.run(main())
