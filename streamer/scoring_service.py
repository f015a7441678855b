"""The scorer service on Kafka: ``score-requests`` -> ``scores``, impressions scored for the
serving AUC, labels from ``samples``, hot swap from ``model-updates``.

One consumer group over score-requests, impressions and samples: the topics are co-partitioned
by user, so a member gets the same partition numbers of each, i.e. the users whose feature-store
partitions (opened read-only) it reads. A plain consumer reads ``model-updates`` from the
beginning so a fresh scorer starts from the newest good version. Delivery is at-least-once:
offsets are committed after the scores are acknowledged, so a crash may answer a request twice
(same request id), never zero times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import torch
from kafka import TopicPartition
from kafka.errors import KafkaError

from dmrstream.contracts import (Candidate, Codec, ContractError, Impression, ModelUpdate, Sample, ScoreRequest,
                                 dead_letter_of, encode)
from dmrstream.kafkaio import TopicIdWatch, make_consumer, make_producer, reread_recreated, wait_for_broker_at_start
from dmrstream.settings import Settings
from monitoring import metrics
from streamer.scoring import ModelHolder, Scorer
from streamer.scoring_auc import ServingAUC
from streamer.scoring_features import StoreFeatures
from streamer.scoring_swap import Swapper, observe_event_time, set_freshness
from trainer.modelstore import ModelStore

log = logging.getLogger(__name__)
COMPONENT = "scorer"


class UpdateFollower(threading.Thread):
    """Reads model-updates from the beginning: the backlog bootstraps, later ones are offered.
    An update that does not decode, or that the swapper refuses (a URI outside the store, a bad
    checksum or file...), is dead-lettered with its reason."""

    def __init__(self, settings: Settings, swapper: Swapper, stop: threading.Event):
        super().__init__(daemon=True, name="scorer-updates")
        self.settings, self.swapper, self.stop = settings, swapper, stop
        self.codec = Codec(ModelUpdate, settings.limits)
        self.bootstrapped = threading.Event()
        self.error: BaseException | None = None
        self.producer: Any = None
        self.records: OrderedDict[int, Any] = OrderedDict()  # version -> its (latest) message
        swapper.on_refused = self._refused

    def _dead(self, r: Any, reason: str) -> None:
        topic = self.settings.topics.name("model_updates")
        metrics.DEAD_LETTERS.labels(COMPONENT, topic, metrics.reason_kind(reason)).inc()
        if self.producer is not None:
            key, value = dead_letter_of(reason, r, COMPONENT)
            self.producer.send(self.settings.topics.name("dead_letters"), key=key, value=value)

    def _refused(self, update: ModelUpdate, reason: str) -> None:
        r = self.records.get(update.version)
        if r is not None:
            self._dead(r, reason)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:
            self.error = e
            self.bootstrapped.set()

    def _run(self) -> None:
        topic = self.settings.topics.name("model_updates")
        # ScorerService.run has waited already; this covers a follower started on its own, or a
        # broker gone again in between (a quick probe when it answers).
        if not wait_for_broker_at_start(self.settings, self.stop, "scorer model-updates follower"):
            return
        consumer = make_consumer(self.settings, None, [])
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        backlog: list[ModelUpdate] = []
        self.producer = make_producer(self.settings)
        watch = TopicIdWatch(topic)
        while not self.stop.is_set():
            polled = consumer.poll(timeout_ms=200)
            reread_recreated(consumer, [watch])  # a memory broker restarted empty: start it over
            for recs in polled.values():
                for r in recs:
                    try:
                        update = self.codec.decode(r.value)
                    except ContractError as e:
                        log.warning("model-updates offset %d: %s", r.offset, e.reason)
                        self._dead(r, e.reason)
                        continue
                    self.records[update.version] = r
                    self.records.move_to_end(update.version)
                    if len(self.records) > 10_000:
                        self.records.popitem(last=False)
                    if self.bootstrapped.is_set():
                        self.swapper.offer(update)
                    else:
                        backlog.append(update)
            if not self.bootstrapped.is_set() and consumer.position(tp) >= end:
                live = self.swapper.bootstrap(backlog)
                log.info("scorer bootstrapped on %s", f"v{live.version}" if live else "no version yet")
                backlog = []
                self.bootstrapped.set()
        consumer.close()
        self.producer.flush(10)


class ScorerService:
    """Wires the pieces; :meth:`run` is the main loop (until ``stop``)."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None):
        self.settings = settings
        self.stop = stop or threading.Event()
        torch.set_num_threads(settings.scorer.threads)
        self.holder = ModelHolder()
        self.swapper = Swapper(self.holder, ModelStore(settings.model_store), settings).start()
        self.features = StoreFeatures(settings)
        self.scorer = Scorer(self.holder, self.features, settings)
        self.auc = ServingAUC(settings.scorer.auc_window, settings.scorer.served_memory)
        self.request_scores: dict[tuple[str, Any], tuple[float, int]] = {}  # (request id, item) -> served
        self.codecs = {"score_requests": Codec(ScoreRequest, settings.limits),
                       "impressions": Codec(Impression, settings.limits), "samples": Codec(Sample, settings.limits)}
        self.topics = {settings.topics.name(k): k for k in self.codecs}
        self.answered = 0
        # Request ids already taken (bounded): a repeated request is answered once, not again.
        self.seen_requests: OrderedDict[str, None] = OrderedDict()
        self._outbox: list[tuple[str, Any, bytes, Any]] = []  # sent, not yet confirmed: (topic, key, value, future)

    def run(self, max_seconds: float | None = None) -> None:
        """Serve until ``stop`` is set (or ``max_seconds`` pass, counted from the broker's answer).
        A broker that is not up yet is waited for first, before any Kafka client is built
        (:func:`~dmrstream.kafkaio.wait_for_broker_at_start`); a stop during that wait returns."""
        s = self.settings
        if not wait_for_broker_at_start(s, self.stop, "scorer"):
            self.swapper.stop()
            self.features.close()
            return
        follower = UpdateFollower(s, self.swapper, self.stop)
        follower.start()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        # Requests wait in Kafka until a version is live: never answered by no model.
        while self.holder.get() is None and not self.stop.is_set():
            if follower.error is not None:
                raise RuntimeError("model-updates consumer failed") from follower.error
            if deadline is not None and time.monotonic() > deadline:
                break
            self.holder.wait(0.5)
        inputs = list(self.topics) if s.scorer.score_impressions else [s.topics.name("score_requests")]
        # Latency-sensitive: a broker that does not wake a parked fetch when data arrives (the
        # local tansu) would otherwise hold each request up to the default 500 ms.
        consumer = make_consumer(s, f"{s.topics.prefix}scorer", inputs, fetch_max_wait_ms=10)
        watches = [TopicIdWatch(t) for t in inputs]  # a memory broker restarted empty: see reread_recreated
        producer = make_producer(s, linger_ms=0)
        last_report = time.monotonic()
        try:
            while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
                polled = consumer.poll(timeout_ms=50, max_records=s.scorer.max_batch * 4)
                reread_recreated(consumer, watches)  # repeats: answered once, AUC joins each label once
                if polled:
                    self._handle([r for recs in polled.values() for r in recs], producer)
                    if self._confirm(producer):
                        self._commit(consumer)
                if time.monotonic() - last_report >= 1.0:
                    last_report = time.monotonic()
                    self.auc.publish_metrics()
                    self.swapper.check_rollback(self.auc)
                    set_freshness(self.holder.get())
        finally:
            producer.flush(timeout=10)
            producer.close(timeout=5)
            consumer.close()
            self.stop.set()
            follower.join(5)
            self.swapper.stop()
            self.features.close()

    def _send(self, producer: Any, topic: str, key: Any, value: bytes) -> None:
        self._outbox.append((topic, key, value, producer.send(topic, key=key, value=value)))

    def _confirm(self, producer: Any) -> bool:
        """Flush and check every send of the batch; resend the failed ones (a broker away or
        restarting) with back-off. False when stopped first: offsets are then not committed, so
        the batch is redelivered."""
        delay = 0.1
        while True:
            producer.flush()
            failed = []
            for topic, key, value, fut in self._outbox:
                try:
                    fut.get(timeout=0)
                except KafkaError as e:
                    failed.append((topic, key, value, e))
            self._outbox = []
            if not failed:
                return True
            log.warning("%d answers/dead letters not delivered (%s); resending in %.1f s", len(failed),
                        failed[0][3], delay)
            if self.stop.wait(delay):
                return False
            delay = min(delay * 2, 5.0)
            for topic, key, value, _ in failed:
                self._send(producer, topic, key, value)

    def _commit(self, consumer: Any) -> None:
        """Commit the consumed offsets; a commit refused after a rebalance or a broker restart is
        not fatal (those records come again: at-least-once, answers keep their request ids)."""
        try:
            consumer.commit()
        except KafkaError as e:
            log.warning("offset commit failed (%s); the batch may be answered again", e)

    def _dead(self, r: Any, reason: str, producer: Any) -> None:
        metrics.DEAD_LETTERS.labels(COMPONENT, r.topic, metrics.reason_kind(reason)).inc()
        self._send(producer, self.settings.topics.name("dead_letters"), *dead_letter_of(reason, r, COMPONENT))

    def _handle(self, records: list, producer: Any) -> None:
        received = time.perf_counter()
        requests: list[tuple[ScoreRequest, Any]] = []
        impressions: list[tuple[Impression, Any]] = []
        for r in records:
            kind = self.topics.get(r.topic)
            metrics.EVENTS_IN.labels(COMPONENT, r.topic).inc()
            try:
                ev = self.codecs[kind].decode(r.value)
            except (ContractError, KeyError) as e:
                self._dead(r, getattr(e, "reason", "topic: unexpected"), producer)
                continue
            if kind == "score_requests":
                if ev.request_id in self.seen_requests:  # a duplicate: already answered
                    metrics.SCORER_RESPONSES.labels("duplicate").inc()
                    continue
                self.seen_requests[ev.request_id] = None
                if len(self.seen_requests) > self.settings.scorer.served_memory:
                    self.seen_requests.popitem(last=False)
                requests.append((ev, r))
            elif kind == "impressions":
                impressions.append((ev, r))
            elif not ev.correction:  # a sample: the label of an impression scored earlier
                self.auc.labelled(ev.event_id, ev.label)
        self._answer(requests, received, producer)
        self._score_impressions(impressions, received)

    def _passes(self, items: list) -> list[list]:
        """Split into micro-batches by request and candidate count."""
        s, out, cur, n = self.settings.scorer, [], [], 0
        for it in items:
            k = len(it[0].candidates)
            if cur and (len(cur) >= s.max_batch or n + k > s.max_batch_candidates):
                out.append(cur)
                cur, n = [], 0
            cur.append(it)
            n += k
        return out + ([cur] if cur else [])

    def _answer(self, requests: list, received: float, producer: Any) -> None:
        topic = self.settings.topics.name("scores")
        for chunk in self._passes(requests):
            results = self.scorer.score_each([q for q, _ in chunk], [r.partition for _, r in chunk],
                                             [received] * len(chunk))
            for (q, r), res in zip(chunk, results):
                if isinstance(res, Exception):  # a request the model cannot score: dead-lettered, counted
                    metrics.SCORER_RESPONSES.labels("dead_letter").inc()
                    self._dead(r, f"scoring: {type(res).__name__}", producer)
                    continue
                self._send(producer, topic, r.key or str(q.user_id).encode(), encode(res))
                metrics.EVENTS_OUT.labels(COMPONENT, topic).inc()
                metrics.SCORER_RESPONSES.labels("ok").inc()
                self.answered += 1
                for it in res.scores:  # what was served, for the impressions that follow
                    self.request_scores[(q.request_id, it.item_id)] = (it.score, res.model_version)
        while len(self.request_scores) > self.settings.scorer.served_memory:
            self.request_scores.pop(next(iter(self.request_scores)))

    def _score_impressions(self, impressions: list, received: float) -> None:
        """Record the served score of each impression: the score its request was answered with
        when there is one, else this scorer's score now (as if requested at the impression)."""
        todo = []
        for imp, r in impressions:
            observe_event_time(imp.ts)
            hit = self.request_scores.get((imp.request_id, imp.item_id)) if imp.request_id else None
            if hit is not None:
                self.auc.served(imp.event_id, *hit)
            else:
                todo.append((ScoreRequest(request_id=imp.event_id, user_id=imp.user_id, ts=imp.ts,
                                          context=imp.context, candidates=[Candidate(
                                              imp.item_id, imp.category_id, imp.item_features)]), r))
        for chunk in self._passes(todo):
            for res in self.scorer.score_each([q for q, _ in chunk], [r.partition for _, r in chunk],
                                              [received] * len(chunk), source="impression"):
                if not isinstance(res, Exception):
                    self.auc.served(res.request_id, res.scores[0].score, res.model_version)


def run(settings: Settings, stop: threading.Event | None = None, max_seconds: float | None = None) -> ScorerService:
    """Run a scorer until ``stop`` is set (or ``max_seconds`` pass)."""
    service = ScorerService(settings, stop)
    service.run(max_seconds)
    return service
