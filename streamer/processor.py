"""Processing of one partition's consumed batches: decode, label join, feature store, samples.

No Kafka here: the faust app (``streamer/app.py``) feeds records in and produces what comes out.
Crash safety with at-least-once delivery, step by step:

1. decoded events wait in the merge (``streamer/reorder.py``) until both inputs reach their event
   time, so the join, counters and sequences see one event-time order whatever the read order;
2. the released behaviour and impression events go to the feature store (idempotent: deduped by
   event id), which tells each impression's counters as it applies them: what it held before
   plus only the events it newly applied earlier in time, so a redelivered batch counts nothing
   twice;
3. the join runs in memory over the released events;
4. the caller produces the samples and dead letters and waits for the broker's acks;
5. only then :meth:`PartitionProcessor.commit` persists the join's and the merge's state changes
   (events still waiting included) in one atomic write;
6. the consumer commits its offsets.

A crash before 5 redelivers the batch: the store ignores the repeats and the join, restored from
its last persisted state, emits the same samples again with the same ids (the trainer drops
repeats). A crash after 5 finds every event joined or waiting in the persisted merge. Nothing is
lost.
"""

from __future__ import annotations

import time

import msgspec
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from dmrstream.contracts import Click, Codec, ContractError, Impression, dead_letter_of
from dmrstream.settings import Settings
from monitoring import metrics
from streamer.join import LabelJoin, Outcome
from streamer.reorder import EventTimeMerger
from streamer.samples import encoded_sample

JOIN_PREFIX = b"join/"
MERGE_PREFIX = b"merge/"
_counters_enc = msgspec.msgpack.Encoder()
_counters_dec = msgspec.msgpack.Decoder(dict[str, float])
_impression_dec = msgspec.json.Decoder(Impression)


class BehaviourStore(Protocol):
    """What the processor needs from a partition's feature store."""

    def apply(self, events: list, *, offsets: dict | None = None,
              extra_changes: dict[bytes, bytes | None] | None = None,
              counters_at: dict[int, dict[str, float]] | None = None) -> Any: ...

    def histories_many(self, user_ids: list, as_of: list[int]) -> list[tuple[list, list, list, list]]: ...

    def iter_extra(self, prefix: bytes) -> Iterable[tuple[bytes, bytes]]: ...


@dataclass(slots=True)
class Record:
    """One consumed message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchResult:
    """What to produce for a batch, and the join state to persist once it is acknowledged."""

    messages: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    state_changes: dict[bytes, bytes | None] = field(default_factory=dict)
    samples: int = 0
    dead: int = 0


class PartitionProcessor:
    """The streamer's work for one partition, over that partition's feature store."""

    def __init__(self, partition: int, store: BehaviourStore, settings: Settings, component: str = "streamer"):
        self.partition = partition
        self.store = store
        self.settings = settings
        self.component = component
        t = settings.topics
        self.impressions_topic, self.clicks_topic = t.name("impressions"), t.name("clicks")
        self.samples_topic, self.dead_topic = t.name("samples"), t.name("dead_letters")
        self.imp_codec = Codec(Impression, settings.limits)
        self.click_codec = Codec(Click, settings.limits)
        j = settings.join
        self.join = LabelJoin(j.attribution_window_ms, j.allowed_lateness_ms, j.emit_corrections, j.late_horizon_ms,
                              inputs=(self.impressions_topic, self.clicks_topic), positives_at=j.positives_at)
        self.join.restore((k[len(JOIN_PREFIX):], v) for k, v in store.iter_extra(JOIN_PREFIX))
        self.merger: EventTimeMerger[Impression | Click] = EventTimeMerger(self.join.inputs)
        self.merger.restore(((k[len(MERGE_PREFIX):], v) for k, v in store.iter_extra(MERGE_PREFIX)), self._decode)
        # An input never seen counts as silent from now: it is marked idle only after idle_input_s.
        started = time.monotonic()
        self.last_seen: dict[str, float] = {t: started for t in self.join.inputs}

    def process(self, records: list[Record]) -> BatchResult:
        """Buffer a batch into event-time order, then join and store what the merge releases;
        returns the messages to produce (samples, dead letters)."""
        result = BatchResult()
        now = time.monotonic()
        for r in records:
            try:
                if r.topic == self.impressions_topic:
                    ev: Impression | Click = self.imp_codec.decode(r.value)
                elif r.topic == self.clicks_topic:
                    ev = self.click_codec.decode(r.value)
                else:
                    raise ContractError(f"topic: not an input of the streamer ({r.topic})")
            except ContractError as e:
                self._dead(result, r, e.reason)
                continue
            self.merger.push(r.topic, ev.ts, ev.event_id, bytes(r.value), ev)
        for topic in {r.topic for r in records}:
            self.last_seen[topic] = now
            metrics.EVENTS_IN.labels(self.component, topic).inc(sum(1 for r in records if r.topic == topic))
        self._handle(self.merger.pop_ready(), result)
        return result

    def _handle(self, released: list, result: BatchResult) -> None:
        """Join and store events released in event-time order."""
        events = [ev for _, _, ev in released]
        # Each impression's point-in-time counters, computed by the store while it applies the
        # events (from the records it decodes anyway): the events strictly before its time, the
        # store's before the batch and the batch's own. Every earlier event of both inputs has
        # been released before (the merge), so the counts do not depend on read order; frozen
        # with the pending impression, so later events never leak into its sample.
        counters_at: dict[int, dict[str, float]] = {}
        if events:
            with metrics.FEATURESTORE_SECONDS.labels("apply").time():
                self.store.apply(events, counters_at=counters_at)
        outcomes: list[Outcome] = []
        encode_counters = _counters_enc.encode
        for topic, raw, ev in released:
            if isinstance(ev, Impression):
                outcomes += self.join.on_impression(ev.event_id, ev.user_id, ev.item_id, ev.ts, ev.request_id,
                                                    raw, topic, encode_counters(counters_at[id(ev)]))
            elif ev.behavior == "click":
                outcomes += self.join.on_click(ev.event_id, ev.user_id, ev.item_id, ev.ts, ev.request_id, topic)
        self._emit(outcomes, result)
        result.state_changes = self._drain_changes()

    def _drain_changes(self) -> dict[bytes, bytes | None]:
        changes = {JOIN_PREFIX + k: v for k, v in self.join.drain_changes().items()}
        changes.update((MERGE_PREFIX + k, v) for k, v in self.merger.drain_changes().items())
        return changes

    def tick(self, idle_after_s: float) -> BatchResult:
        """Mark an input idle when it has been silent for ``idle_after_s`` while another input
        kept flowing (so the merge releases and the watermark advances, and negatives go out when,
        say, clicks stop). When every input is silent nothing is marked: a pause upstream must not
        expire impressions whose clicks are merely late. Returns what that emits."""
        result = BatchResult()
        now = time.monotonic()
        outcomes: list[Outcome] = []
        topics = (self.impressions_topic, self.clicks_topic)
        silent = {t for t in topics if now - self.last_seen[t] > idle_after_s}
        idle_now = [t for t in silent if any(o not in silent for o in topics if o != t)]  # another flows
        released: list = []
        for topic in idle_now:
            if topic not in self.merger.idle:
                self.merger.set_idle(topic, True)
                released += self.merger.pop_ready()
        if released:
            self._handle(released, result)
        for topic in idle_now:
            if topic in self.join.high and topic not in self.join.idle:
                outcomes += self.join.set_idle(topic, True)
        self._emit(outcomes, result)
        result.state_changes.update(self._drain_changes())
        return result

    def commit(self, result: BatchResult) -> None:
        """Persist the join's changes once the batch's messages are acknowledged by the broker."""
        if result.state_changes:
            self.store.apply([], extra_changes=result.state_changes)
        part = str(self.partition)
        wm = self.join.watermark
        if wm is not None:
            metrics.WATERMARK.labels(part).set(wm)
        # The join holds each of these in memory (~500 bytes, bench/join.py): what sizes a worker.
        metrics.PENDING.labels(part).set(len(self.join.pending))
        metrics.FINISHED.labels(part).set(len(self.join.done))
        metrics.EARLY_CLICKS.labels(part).set(len(self.join.early))
        metrics.REORDER_BUFFERED.labels(part).set(len(self.merger))

    def _decode(self, topic: str, raw: bytes) -> Impression | Click:
        return (self.imp_codec if topic == self.impressions_topic else self.click_codec).decode(raw)

    def _emit(self, outcomes: list[Outcome], result: BatchResult) -> None:
        """Samples of the labelled impressions: their histories as of each impression in one
        multi-get (each user decoded once), the impression from the join's copy of its message."""
        kinds: dict[str, int] = {}
        todo = []
        for o in outcomes:
            kinds[o.kind] = kinds.get(o.kind, 0) + 1
            if o.kind != "late_click" and o.raw is not None:
                todo.append(o)
        for kind, n in kinds.items():
            metrics.JOIN_OUTCOMES.labels(kind).inc(n)
        if not todo:
            return
        # The join's raw message passed the codec's checks when it arrived: parse it again
        # without repeating them (a corrupt persisted one still raises, as before).
        imps = [_impression_dec.decode(o.raw) for o in todo]
        histories = self.store.histories_many([i.user_id for i in imps], [i.ts for i in imps])
        append, topic, dec = result.messages.append, self.samples_topic, _counters_dec.decode
        for o, imp, history in zip(todo, imps, histories):
            sample = encoded_sample(imp, 0 if o.kind == "negative" else 1, history,
                                    dec(o.extra) if o.extra else None, correction=o.kind == "correction")
            append((topic, str(imp.user_id).encode(), sample))
        result.samples += len(todo)

    def _dead(self, result: BatchResult, r: Record, reason: str) -> None:
        metrics.DEAD_LETTERS.labels(self.component, r.topic, metrics.reason_kind(reason)).inc()
        result.messages.append((self.dead_topic, *dead_letter_of(reason, r, self.component)))
        result.dead += 1
