"""Where replayed or simulated events go: Kafka, a JSON-lines file, or a list (tests, tools).

Every sink takes (logical topic, key, value bytes) and reports delivery failures at ``close``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from dmrstream.settings import Settings

log = logging.getLogger(__name__)


class Sink(Protocol):
    def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Queue one event; ``topic`` is the logical name ("impressions" or "clicks")."""

    def idle(self, pause_s: float) -> None:
        """The stream pauses for ``pause_s`` seconds (pacing): push out what is buffered."""

    def close(self) -> int:
        """Deliver everything queued; return the number of events that could not be delivered."""


class ListSink:
    """Keeps (topic, key, value) in memory."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, value))

    def idle(self, pause_s: float) -> None:
        pass

    def close(self) -> int:
        return 0


class JsonlSink:
    """One encoded event per line, impressions and clicks interleaved in send order. ``dmrstream
    replay FILE`` reads it back (so "simulate to a file, replay later" works)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb", buffering=1 << 20)

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._fh.write(value + b"\n")

    def idle(self, pause_s: float) -> None:
        self._fh.flush()  # a reader tailing the file sees events as they are paced out

    def close(self) -> int:
        self._fh.close()
        return 0


def kafka_sink(settings: Settings, client: str = "aiokafka") -> Sink:
    """The Kafka sink of the CLI: ``aiokafka`` (batches built in C, the fast default) or
    ``kafka-python`` (the project's ``make_producer``, ~18k events/s here)."""
    if client == "kafka-python":
        return KafkaSink(settings)
    if client == "aiokafka":
        from replay.fastkafka import BatchKafkaSink

        return BatchKafkaSink(settings)
    raise ValueError(f"unknown Kafka client {client!r}: aiokafka or kafka-python")


class KafkaSink:
    """The project's batching, lz4-compressing, acks=all producer, keyed by user (so the default
    partitioner co-partitions impressions and clicks). Failures are counted from the delivery
    callbacks and from sends refused outright (e.g. buffer full past ``max_block_ms``)."""

    def __init__(self, settings: Settings, **producer_overrides) -> None:
        from dmrstream.kafkaio import make_producer

        self.topics = {name: settings.topics.name(name) for name in ("impressions", "clicks")}
        self.producer = make_producer(settings, **producer_overrides)
        self.failures = 0
        self.first_error: str | None = None

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.first_error is None:
            self.first_error = repr(exc)
            log.error("delivery failed: %r", exc)

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        try:
            self.producer.send(self.topics[topic], key=key, value=value).add_errback(self._failed)
        except Exception as e:  # refused before queuing: counted, the replay goes on
            self._failed(e)

    def idle(self, pause_s: float) -> None:
        pass  # kafka-python's own sender thread lingers and sends

    def close(self, timeout_s: float = 120.0) -> int:
        try:
            self.producer.flush(timeout=timeout_s)
        except Exception as e:
            self._failed(e)
        finally:
            self.producer.close(timeout=10)
        return self.failures
