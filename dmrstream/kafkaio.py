"""Kafka plumbing on kafka-python 3.x: client factories from settings and topic creation.

Security options (SASL/SSL) are passed through unchanged, so the same code talks to the local
tansu broker and to a secured production cluster.
"""

from __future__ import annotations

import logging
import socket
import threading
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
    cluster = _cluster(consumer)
    tid = cluster.topic_id(topic) if hasattr(cluster, "topic_id") else None
    return str(tid) if tid is not None else None


def _cluster(consumer: KafkaConsumer) -> Any:
    return getattr(getattr(consumer, "_client", None), "cluster", None)


class TopicIdWatch:
    """Tells a reader that keeps its own positions when ``topic`` was deleted and re-created under
    it (:func:`topic_id_of` changed): it should then read the new log from the beginning.

    kafka-python refreshes its metadata only on an error or every ``metadata_max_age_ms`` (5
    minutes), and reading past the end of a re-created log raises no error on the local broker:
    the watch asks for a refresh itself, at most every ``refresh_s``, so a re-creation is seen
    within about that long (one metadata request each time: nothing next to the fetches)."""

    def __init__(self, topic: str, known: str | None = None, refresh_s: float = 2.0):
        self.topic, self.known = topic, known  # ``known``: the id the reader's positions belong to
        self.refresh_s = refresh_s
        self._asked = time.monotonic()

    def recreated(self, consumer: KafkaConsumer) -> bool:
        """Check after a poll. True once per change (never on the first sighting), logged. Asks
        for fresh metadata (fetched by a later poll) when the last ask is ``refresh_s`` old."""
        now = time.monotonic()
        if now - self._asked >= self.refresh_s:
            self._asked = now
            cluster = _cluster(consumer)
            if hasattr(cluster, "request_update"):
                cluster.request_update()
        tid = topic_id_of(consumer, self.topic)
        if tid is None or tid == self.known:
            return False
        old, self.known = self.known, tid
        if old is None:
            return False
        log.warning("%s was re-created (topic id %s -> %s): reading it from the beginning", self.topic, old, tid)
        return True


def reread_recreated(consumer: KafkaConsumer, watches: Iterable[TopicIdWatch]) -> set[str]:
    """Call after each poll: the assigned partitions of a topic whose watch says it was re-created
    go back to the new log's beginning; returns those topics. Needed by a group member too:
    kafka-python keeps a retained partition's position across a rejoin, and tansu answers a fetch
    past the new log's end with nothing, so a member can sit past the end of a re-created topic
    and commit there. The poll's records are still the caller's to handle (some may have been
    fetched from the old log; new ones come again: readers drop repeats by id)."""
    recreated = {w.topic for w in watches if w.recreated(consumer)}
    parts = [tp for tp in consumer.assignment() if tp.topic in recreated] if recreated else []
    if parts:
        consumer.seek_to_beginning(*parts)
    return recreated


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


STILL_WAITING_LOG_S = 30.0  # a role waiting for its broker says so again this often


def _tcp_error(bootstrap: str) -> str | None:
    """None when a bootstrap server accepts a TCP connection, else the last reason why not."""
    why = "no bootstrap server"
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=1.0).close()
            return None
        except (OSError, ValueError) as e:
            why = f"{hostport.strip()}: {getattr(e, 'strerror', None) or e}"
    return why


def _probe(settings: Settings) -> str | None:
    """None when the cluster answers a metadata request, else why not. A TCP probe first, so a
    dead address fails fast."""
    why = _tcp_error(settings.kafka.bootstrap_servers)
    if why is not None:
        return why
    # Built in two steps because a KafkaAdminClient whose bootstrap fails raises from __init__
    # with its IO thread already running: retried for hours, that would leak a thread per try.
    admin = KafkaAdminClient.__new__(KafkaAdminClient)
    try:
        admin.__init__(**client_config(settings.kafka) | {"bootstrap_timeout_ms": 10_000})
        admin.list_topics()
        return None
    except Exception as e:  # noqa: BLE001 - any failure (SSL, SASL, config) is reported, then retried
        return f"{type(e).__name__}: {e}"
    finally:
        if getattr(admin, "_closed", True) is False:
            admin.close()
        else:  # half-built: stop what its constructor started
            for part, method in (("_client", "close"), ("_net", "stop")):
                try:
                    getattr(getattr(admin, part, None), method, lambda: None)()
                except Exception:  # noqa: BLE001 - best effort on a client that never worked
                    pass


def wait_for_broker(settings: Settings, timeout_s: float | None = 30.0, stop: threading.Event | None = None,
                    waiter: str | None = None, max_backoff_s: float = 1.0) -> bool:
    """Block until the cluster answers a metadata request, retrying with back-off (doubling from
    50 ms up to ``max_backoff_s``). Returns True once it answers, False as soon as ``stop`` is set:
    each probe runs on a daemon thread and ``stop`` is checked every 0.1 s, so a signal handler
    that sets it ends the wait at once even while a probe hangs on an address that drops packets.
    Raises :class:`BrokerUnavailable` after ``timeout_s`` (None: never).

    ``waiter`` (the waiting role's name) turns on the log lines an operator needs: a warning
    naming the address when the first probe fails, again every ``STILL_WAITING_LOG_S``, and a line
    when the broker answers."""
    bootstrap = settings.kafka.bootstrap_servers
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    delay, next_log, waited, why = 0.05, started, False, "no answer yet"
    pause = stop.wait if stop is not None else time.sleep
    while True:
        if stop is not None and stop.is_set():
            if waiter:
                log.info("%s: stopped while waiting for the Kafka broker at %s", waiter, bootstrap)
            return False
        result: list[str | None] = []
        probe = threading.Thread(target=lambda: result.append(_probe(settings)), daemon=True, name="kafka-probe")
        probe.start()
        while probe.is_alive() and not (stop is not None and stop.is_set()) \
                and (deadline is None or time.monotonic() < deadline):
            probe.join(0.1)
        if stop is not None and stop.is_set():
            continue
        if result and result[0] is None:
            if waiter and waited:
                log.info("%s: Kafka broker at %s answers after %.1f s", waiter, bootstrap, time.monotonic() - started)
            return True
        why = result[0] if result else why  # a probe still running past the deadline: the last reason
        if deadline is not None and time.monotonic() >= deadline:
            raise BrokerUnavailable(f"no Kafka broker answers at {bootstrap} after {timeout_s:g} s ({why})")
        if waiter and time.monotonic() >= next_log:
            state = f"still waiting after {time.monotonic() - started:.0f} s" if waited else "waiting"
            log.warning("%s: %s for the Kafka broker at %s (%s); retrying with back-off up to %.0f s%s", waiter,
                        state, bootstrap, why, max_backoff_s, "" if waited else "; SIGTERM/Ctrl-C stops")
            next_log = time.monotonic() + STILL_WAITING_LOG_S
        waited = True
        pause(delay)
        delay = min(delay * 2, max_backoff_s)


def wait_for_broker_at_start(settings: Settings, stop: threading.Event, role: str) -> bool:
    """What a long-running role does before it builds its first Kafka client: wait for the broker
    for as long as it takes, saying so (a warning with the address at once, again every 30 s;
    back-off up to 5 s). True when the broker answers; False when ``stop`` (set by the role's
    SIGTERM/SIGINT handler) came first, and the role then exits cleanly with code 0.

    No time limit, on purpose: service managers (systemd, Kubernetes, Compose) start roles and
    brokers in any order and restart a role that exits. A role that gave up would be restarted
    into the same wait, or into a crash loop whose growing restart delays slow the recovery once
    the broker is back; waiting in place ends the moment the broker answers, and the periodic
    warnings make a wrong address as visible as a crash would."""
    return wait_for_broker(settings, timeout_s=None, stop=stop, waiter=role, max_backoff_s=5.0)


def _has_lz4() -> bool:
    try:
        import lz4.frame  # noqa: F401
        return True
    except ImportError:
        return False
