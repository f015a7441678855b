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
messages of such a topic go to its buffer together after the fetch (read offsets and gaps
kept as faust keeps them). That takes faust's floor from ~14,000 to ~140,000 events/s here.

A third: for those topics, what faust's ``getmany`` does per record (generation and partition
checks, the end-offset sensor, a ``ConsumerMessage`` built from aiokafka's record) and the loop's
read-offset and gap bookkeeping are done once per partition of a fetch, and aiokafka's records go
to the buffer as they are (:class:`~streamer.faust_batches.FetchedRun`): the floor went from
~200,000 to ~260,000 events/s (bench/streamer.py, paired runs).

The methods below are faust-streaming 0.15.3's ``_drain_messages`` and ``getmany`` with these
changes (the pin in pyproject/requirements.lock; tests/unit/test_faust_transport.py fails when
faust's own methods change, so that this copy is reviewed on an upgrade).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Generator

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver

from streamer.faust_batches import FetchedRun


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
                # change 3: getmany's fetch, whole-fetch topics split off per partition
                fetch = await self._fetch(timeout=1.0)
                await self.sleep(0)
                if fetch is not None and not self.should_stop:
                    records, active_partitions, generation_id = fetch
                    whole = {tp: recs for tp, recs in records.items() if tp.topic in sinks} if sinks else None
                    if whole:  # change 2: a whole-fetch topic's messages go over per fetch
                        records = {tp: recs for tp, recs in records.items() if tp not in whole}
                        fetched = await self._whole_fetch_runs(whole, active_partitions, generation_id)
                        for sink, runs in fetched.items():
                            await self._hand_over_fetch(sink, runs)
                    async for tp, message in self._messages(records, active_partitions, generation_id):
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

    # -- faust's getmany in two parts: the fetch, then its messages --------------------------------
    async def _fetch(self, timeout: float) -> tuple[dict, Any, int] | None:
        """The first half of faust's ``getmany``: the next fetch's records by partition, the
        active partitions and the consumer generation they were fetched in; None when there is
        nothing (or the flow is suspended: then, as faust, seek back to the committed offsets)."""
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return None
        if not self.flow_active:
            self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
            try:
                await self.perform_seek()
            except Exception as ex:
                self.log.warning(f"exception performing seek when flow not active {ex}")
            return None
        return records, active_partitions, generation_id

    async def _messages(self, records: dict, active_partitions: Any, generation_id: int) -> Any:
        """The second half of faust's ``getmany``: faust messages, round-robin over partitions."""
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active:
                break
            if self.app.consumer_generation_id != generation_id:
                self.log.dev("Generation id changed from %r to %r. Cancelling getmany.",
                             generation_id, self.app.consumer_generation_id)
                break
            if active_partitions is None or tp in active_partitions or tp in self._buffered_partitions:
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                yield tp, to_message(tp, record)

    async def _whole_fetch_runs(self, records: dict, active_partitions: Any, generation_id: int) -> dict:
        """A fetch's records of whole-fetch topics as :class:`FetchedRun`\\ s per sink: what
        ``getmany`` and the per-message loop do per message (generation and partition checks,
        end-offset sensor, read offsets, gaps, periodic commit), done once per partition, and no
        faust message object per record (the records are aiokafka's, with the attributes the
        streamer reads: topic, partition, offset, key, value)."""
        sinks, acks_enabled_for = self.transport.fetch_batches, self.app.topics.acks_enabled_for
        read_offset = self._read_offset
        fetched: dict = {}
        for tp, recs in records.items():
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break  # as getmany: a rebalance began; the rest is fetched again
            if not (active_partitions is None or tp in active_partitions or tp in self._buffered_partitions):
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            r_offset = read_offset[tp]
            if r_offset is not None and recs and recs[0].offset < r_offset:
                recs = [r for r in recs if r.offset >= r_offset]  # read before: faust drops them
            if not recs:
                continue
            first, last = recs[0].offset, recs[-1].offset
            if acks_enabled_for(tp.topic) and (last - first + 1 != len(recs) or (r_offset and first - r_offset > 1)):
                prev = r_offset  # offsets skipped (compaction, transaction markers): faust's gaps
                for r in recs:
                    if prev and r.offset - prev > 1:
                        await self._add_gap(tp, prev + 1, r.offset)
                    prev = r.offset
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            read_offset[tp] = last
            fetched.setdefault(sinks[tp.topic], []).append(FetchedRun(tp, generation_id, recs))
        return fetched

    async def _hand_over_fetch(self, sink: Any, runs: list) -> None:
        """Give a fetch's runs of a whole-fetch topic to its buffer; when that is full, wait
        for room racing a rebalance, as faust's per-message hand-over does (a rebalance drops
        the fetch: it is fetched again from the committed offsets)."""
        if sink.full():
            await self.wait_first(sink.wait_room(), self.suspend_flow.wait())
        if self.suspend_flow.is_set() or not self.app.flow_control.is_active():
            return
        sink.put(runs)


class EagerHandOverTransport(aiokafka_driver.Transport):
    """faust's aiokafka transport with :class:`EagerHandOverConsumer`; ``fetch_batches`` maps
    a topic to the :class:`~streamer.faust_batches.FetchBatches` that takes its whole fetches."""

    Consumer = EagerHandOverConsumer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_batches: dict[str, Any] = {}
