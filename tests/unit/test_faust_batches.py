"""streamer/faust_batches.py without a broker: batches of whole fetches, only the current consumer
generation, tracked until acked through faust's consumer, dropped on a rebalance."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from mode.utils.queues import FlowControlEvent

from streamer.faust_batches import FetchBatches

# sha256 of faust-streaming 0.15.3's Consumer.track_message and Consumer.unacked sources:
# FetchBatches does track_message's work itself (adds to the live ``unacked`` set, without the
# per-message sensor call); when faust changes either, review FetchBatches.take (then update).
FAUST_TRACK_SHA256 = "217d7f1399a4cd8e15a43a64ecf50413b9b738058e5433e057f0dc3927a3fc03"
FAUST_UNACKED_SHA256 = "7b6ebac5ffdcb6b7ce6306b6198cf1b6dd114e01da9baa76c1dd51ce67a2058a"


class Unacked(list):
    def update(self, ms):
        self.extend(m.offset for m in ms)


class FakeConsumer:
    def __init__(self):
        self.tracked, self.acked = Unacked(), []

    @property
    def unacked(self):
        return self.tracked

    def ack(self, m):
        if m.offset in self.acked:
            return False
        self.acked.append(m.offset)
        return True


def make_app():
    app = SimpleNamespace(consumer=FakeConsumer(), consumer_generation_id=1, topics=set(),
                          transport=SimpleNamespace(fetch_batches={}),
                          flow_control=FlowControlEvent(initially_suspended=False))
    return app


def msgs(offsets, generation=1, topic="t.imp"):
    return [SimpleNamespace(topic=topic, tp=(topic, 0), offset=o, generation_id=generation) for o in offsets]


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
        assert [m.offset for m in first] == [0, 1, 2, 3] and app.consumer.tracked == [0, 1, 2, 3]
        rest = await b.take(100, within=0)
        assert [m.offset for m in rest] == [4, 5, 6, 7]
        assert app.consumer.acked == []  # nothing committed before the batch is done
        b.ack(first)
        b.ack(first)  # a repeat acks nothing twice
        assert app.consumer.acked == [0, 1, 2, 3]

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
        assert [m.offset for m in got] == [7] and app.consumer.tracked == [7]

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
        assert [m.offset for m in await asyncio.wait_for(task, 1)] == [5]
        assert app.consumer.tracked == [5]  # the dropped ones were never tracked: fetched again

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
