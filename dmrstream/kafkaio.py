"""Kafka plumbing on kafka-python 3.x: client factories from settings and topic creation.

Security options (SASL/SSL) are passed through unchanged, so the same code talks to the local
tansu broker and to a secured production cluster.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from dmrstream.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)


def client_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments shared by every kafka-python client (connection and security)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers.split(","),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
        # Reconnect by ourselves with back-off, never in a busy loop.
        "reconnect_backoff_ms": 100,
        "reconnect_backoff_max_ms": 5_000,
    }
    if kafka.sasl_mechanism:
        cfg["sasl_mechanism"] = kafka.sasl_mechanism
        cfg["sasl_plain_username"] = kafka.sasl_plain_username
        if kafka.sasl_plain_password is not None:
            cfg["sasl_plain_password"] = kafka.sasl_plain_password.get_secret_value()
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        cfg["ssl_check_hostname"] = kafka.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(kafka, name):
                cfg[name] = getattr(kafka, name)
    return cfg


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer that batches and compresses; keys and values are bytes."""
    cfg = client_config(settings.kafka) | {
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "compression_type": "lz4" if _has_lz4() else "gzip",
        "retries": 2**31 - 1,
        "max_in_flight_requests_per_connection": 1,  # keep per-partition order across retries
        # No idempotent producer: after a broker restart its producer id is unknown and the epoch
        # bump (KIP-360) fails on tansu, leaving the producer failing every send for good. Order
        # holds with one request in flight; a retry may repeat a message, which every consumer
        # here drops by id (at-least-once plus idempotent state, SPEC section 11).
        "enable_idempotence": False,
        # Topics are created by `topics create` / `dmrstream broker` only: a send racing a broker
        # restart must not auto-create one with the broker's default partition count.
        "allow_auto_create_topics": False,
        "max_request_size": max(1_048_576, settings.limits.max_message_bytes + 65_536),
    }
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def make_consumer(settings: Settings, group_id: str | None, topics: Iterable[str] = (),
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits (components commit after their state is durable)."""
    cfg = client_config(settings.kafka) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka.session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka.heartbeat_interval_ms,
        "max_poll_records": 2000,
        "allow_auto_create_topics": False,  # see make_producer
        "fetch_max_bytes": 32 * 1024 * 1024,
        "max_partition_fetch_bytes": max(1_048_576, settings.limits.max_message_bytes + 65_536),
    }
    cfg.update(overrides)
    consumer = KafkaConsumer(**cfg)
    topics = list(topics)
    if topics:
        consumer.subscribe(topics)
    return consumer


def topic_id_of(consumer: KafkaConsumer, topic: str) -> str | None:
    """The topic's id in the consumer's latest metadata (None until known). It changes when the
    topic is deleted and re-created, e.g. by a memory-storage broker (the local tansu) that
    restarted empty: positions held from before then point into a different log (tansu answers a
    fetch past its end with nothing rather than OFFSET_OUT_OF_RANGE, so the reader would silently
    skip the new log's first records); readers that keep their own positions start it over."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    tid = cluster.topic_id(topic) if hasattr(cluster, "topic_id") else None
    return str(tid) if tid is not None else None


def make_admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**client_config(settings.kafka))


def topic_specs(settings: Settings) -> dict[str, int]:
    """Full topic name -> partition count. User-keyed topics share ``topics.partitions``."""
    t = settings.topics
    specs = {t.name(n): t.partitions for n in t.CO_PARTITIONED}
    specs.update({t.name(n): 1 for n in t.SINGLE_PARTITION})
    specs[t.name("dead_letters")] = t.partitions
    return specs


def create_topics(settings: Settings, admin: KafkaAdminClient | None = None,
                  replace_mismatched: bool = False) -> dict[str, str]:
    """Create every topic that does not exist yet; returns ``{topic: "created"|"exists"|"replaced"}``.

    Raises ``ValueError`` when an existing co-partitioned topic has the wrong partition count:
    joining topics with different counts silently splits users across workers.
    ``replace_mismatched`` (only for a broker that has just started, whose topics are empty): such a
    topic was auto-created by a client that reconnected first (tansu ignores the clients' "no
    auto-creation" flag), so it is deleted and created again with the right count.
    """
    own = admin is None
    if own:
        wait_for_broker(settings, timeout_s=10.0)
    admin = admin or make_admin(settings)
    try:
        specs = topic_specs(settings)
        result: dict[str, str] = {}
        for attempt in range(20 if replace_mismatched else 1):
            existing = describe_partitions(admin, list(specs))
            for name in [n for n in specs if n not in existing]:
                try:
                    admin.create_topics([NewTopic(name, specs[name], settings.topics.replication_factor)])
                    result.setdefault(name, "created")
                except TopicAlreadyExistsError:
                    result.setdefault(name, "exists")
            wrong = {name: n for name, n in describe_partitions(admin, list(specs)).items() if n != specs[name]}
            for name in existing:
                result.setdefault(name, "exists")
            if not wrong:
                break
            if not replace_mismatched:
                name, n = next(iter(wrong.items()))
                raise ValueError(f"topic {name} has {n} partitions, settings say {specs[name]}")
            admin.delete_topics(list(wrong))
            for name in wrong:
                result[name] = "replaced"
            time.sleep(0.05 * (attempt + 1))
        else:
            name, n = next(iter(wrong.items()))
            raise ValueError(f"topic {name} keeps being created with {n} partitions, settings say {specs[name]}")
        _wait_for_metadata(admin, list(specs))
        return result
    finally:
        if own:
            admin.close()


def describe_partitions(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts of the topics among ``names`` that exist."""
    present = set(admin.list_topics())
    wanted = [n for n in names if n in present]
    if not wanted:
        return {}
    return {d.get("name", d.get("topic")): len(d["partitions"]) for d in admin.describe_topics(wanted)
            if not d.get("error_code")}


def list_topics(settings: Settings) -> dict[str, int]:
    """Topics on the cluster with their partition counts."""
    wait_for_broker(settings, timeout_s=10.0)
    admin = make_admin(settings)
    try:
        return describe_partitions(admin, sorted(admin.list_topics()))
    finally:
        admin.close()


def _wait_for_metadata(admin: KafkaAdminClient, names: list[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if set(names) <= set(admin.list_topics()):
            return
        time.sleep(0.1)
    raise KafkaError(f"topics not visible after {timeout_s}s: {names}")


class BrokerUnavailable(ConnectionError):
    """No bootstrap server answered in time."""


def _tcp_reachable(bootstrap: str) -> bool:
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=1.0).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def wait_for_broker(settings: Settings, timeout_s: float = 30.0) -> None:
    """Block until the cluster answers a metadata request, with back-off; else raise
    :class:`BrokerUnavailable`. A TCP probe first, so a dead address fails fast."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    last: Exception | None = None
    while True:
        if _tcp_reachable(settings.kafka.bootstrap_servers):
            try:
                admin = make_admin(settings)
                admin.list_topics()
                admin.close()
                return
            except (KafkaError, OSError) as e:
                last = e
        if time.monotonic() > deadline:
            raise BrokerUnavailable(
                f"no Kafka broker answers at {settings.kafka.bootstrap_servers} after {timeout_s:.0f}s"
                + (f" ({last})" if last else ""))
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _has_lz4() -> bool:
    try:
        import lz4.frame  # noqa: F401
        return True
    except ImportError:
        return False
