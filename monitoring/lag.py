"""Consumer lag per group and partition, from the cluster itself (no cooperation of the consumers).

Every consumer group whose name starts with the topic prefix (the streamer's faust group
``{prefix}streamer``, the scorers' groups, the trainer's ``{prefix}trainer``) is read: its
committed offsets against the topics' end offsets give ``dmrstream_consumer_lag{group, topic,
partition}``. The trainer assigns its partitions by hand and resumes from its checkpoints; it
commits each checkpoint's offsets to its group (trainer/prefetch.py), so its lag is what it has
learned durably.
"""

from __future__ import annotations

import logging
import threading

from dmrstream.settings import Settings
from monitoring import metrics

log = logging.getLogger(__name__)


class LagMonitor:
    """Call :meth:`poll` (or :meth:`run` in a thread) to refresh the lag gauges."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._admin = None
        self._consumer = None
        self.last: dict[tuple[str, str, int], int] = {}

    def _clients(self):
        if self._admin is None:
            from dmrstream.kafkaio import make_admin, make_consumer

            self._admin = make_admin(self.settings)
            self._consumer = make_consumer(self.settings, None, [])
        return self._admin, self._consumer

    def poll(self) -> dict[tuple[str, str, int], int]:
        from kafka import TopicPartition

        admin, consumer = self._clients()
        prefix = self.settings.topics.prefix
        groups = [_group_name(g) for g in admin.list_groups()]
        groups = [g for g in groups if g and g.startswith(prefix)]
        committed: dict[str, dict] = {}
        for g in groups:  # one at a time: older brokers (and tansu) take one group per request
            for name, offsets in admin.list_group_offsets({g: None}).items():
                committed[name] = {tp: om.offset for tp, om in offsets.items() if tp.topic.startswith(prefix)}
        tps = {tp for offs in committed.values() for tp in offs}
        for name, n in _topic_partitions(consumer, prefix).items():
            tps.update(TopicPartition(name, p) for p in range(n))
        ends = consumer.end_offsets(list(tps)) if tps else {}
        for tp, end in ends.items():
            metrics.TOPIC_END_OFFSET.labels(tp.topic, str(tp.partition)).set(end)
        lag: dict[tuple[str, str, int], int] = {}
        for g, offs in committed.items():
            for tp, off in offs.items():
                end = ends.get(tp)
                if end is None or off is None or off < 0:
                    continue
                lag[(g, tp.topic, tp.partition)] = max(0, end - off)
                metrics.CONSUMER_LAG.labels(g, tp.topic, str(tp.partition)).set(lag[(g, tp.topic, tp.partition)])
        self.last = lag
        return lag

    def run(self, stop: threading.Event, every_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception as e:  # the broker may come and go; keep trying
                log.debug("lag poll failed: %s", e)
                self.close()
            stop.wait(every_s)
        self.close()

    def close(self) -> None:
        for c in (self._consumer, self._admin):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass
        self._admin = self._consumer = None


def _group_name(g) -> str | None:
    if isinstance(g, dict):
        return g.get("group_id") or g.get("group")
    if isinstance(g, (tuple, list)):
        return g[0]
    return getattr(g, "group_id", None) or getattr(g, "group", None)


def _topic_partitions(consumer, prefix: str) -> dict[str, int]:
    out = {}
    for name in consumer.topics():
        if name.startswith(prefix):
            parts = consumer.partitions_for_topic(name) or ()
            out[name] = len(parts)
    return out
