"""Replay and simulate into the real local broker: every event lands once, keyed by user,
impressions and clicks co-partitioned, each user's events in event-time order; the CLI as a user
runs it, with its summary and exit codes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmrstream.contracts import Click, Codec, Impression
from dmrstream.kafkaio import create_topics, make_consumer
from replay.records import BadRows
from replay.pacing import Pacer
from replay.runner import flatten, run
from replay.simulate import SimConfig, simulate
from replay.sinks import kafka_sink
from replay.sources import ReplayOptions, open_sources

pytestmark = pytest.mark.kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_replay_formats import TAOBAO, write_alimama  # noqa: E402


def consume_all(settings, want: int, timeout_s: float = 60.0) -> dict[str, list]:
    topics = [settings.topics.name("impressions"), settings.topics.name("clicks")]
    consumer = make_consumer(settings, None)
    from kafka import TopicPartition

    consumer.assign([TopicPartition(t, p) for t in topics for p in range(settings.topics.partitions)])
    got = {t: [] for t in topics}
    n, deadline = 0, time.monotonic() + timeout_s
    while n < want and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500).items():
            got[tp.topic].extend(records)
            n += len(records)
    # Nothing more than expected arrives (no duplicates).
    for tp, records in consumer.poll(timeout_ms=1000).items():
        got[tp.topic].extend(records)
    consumer.close()
    return got


def check_delivery(settings, expected) -> None:
    got = consume_all(settings, len(expected))
    imp_codec, click_codec = Codec(Impression, settings.limits), Codec(Click, settings.limits)
    decoded = [(r, imp_codec.decode(r.value)) for r in got[settings.topics.name("impressions")]]
    decoded += [(r, click_codec.decode(r.value)) for r in got[settings.topics.name("clicks")]]
    assert sorted(e.event_id for _, e in decoded) == sorted(e.event_id for e in expected)
    by_id = {e.event_id: e for e in expected}
    partition_of_user: dict[str, int] = {}
    for r, e in decoded:
        assert e == by_id[e.event_id] and r.key == str(e.user_id).encode()
        assert partition_of_user.setdefault(r.key, r.partition) == r.partition  # co-partitioned
    # Within each partition of each topic, events are in the order replay sent them.
    position = {e.event_id: i for i, e in enumerate(expected)}
    for topic in got:
        per_partition: dict[int, list[int]] = {}
        for r in sorted(got[topic], key=lambda r: (r.partition, r.offset)):
            per_partition.setdefault(r.partition, []).append(position[(imp_codec if "impr" in topic else click_codec)
                                                                      .decode(r.value).event_id])
        assert all(seq == sorted(seq) for seq in per_partition.values())


@pytest.mark.parametrize("client", ["aiokafka", "kafka-python"])
def test_replay_into_kafka(kafka_settings, tmp_path, client):
    s = kafka_settings
    create_topics(s)
    ali = write_alimama(tmp_path / "ali")
    taobao = tmp_path / "UserBehavior.csv"
    taobao.write_text(TAOBAO)
    bad = BadRows()
    records, _ = open_sources([ali, taobao], ReplayOptions(negatives=2), bad, s.limits)
    expected = list(flatten(records))
    bad = BadRows()
    records, _ = open_sources([ali, taobao], ReplayOptions(negatives=2), bad, s.limits)
    summary = run(flatten(records), kafka_sink(s, client), bad=bad)
    assert summary.events == len(expected) and summary.delivery_failures == 0 and bad.count == 7
    check_delivery(s, expected)


def test_simulate_into_kafka_at_a_steady_rate(kafka_settings):
    """Paced: partial batches go out while the stream waits (linger), none is lost or reordered."""
    s = kafka_settings
    create_topics(s)
    expected = list(simulate(SimConfig(users=500, items=2_000, categories=20, seed=5), events=5_000))
    summary = run(iter(expected), kafka_sink(s), pacer=Pacer(rate=5_000))
    assert summary.events == 5_000 and summary.delivery_failures == 0
    assert summary.elapsed_s > 0.9
    check_delivery(s, expected)


@pytest.mark.parametrize("client", ["aiokafka", "kafka-python"])
def test_refused_sends_are_counted_not_raised(kafka_settings, client):
    s = kafka_settings
    create_topics(s)
    sink = kafka_sink(s, client)
    sink.send("impressions", b"1", b"x" * 3_000_000)  # over the producer's max_request_size
    sink.send("impressions", b"1", b"{}")
    assert sink.close() == 1 and "MessageSizeTooLarge" in sink.first_error


BIN = [sys.executable, "-m", "dmrstream"]


def cli(settings, *args, timeout=120):
    return subprocess.run([*BIN, "--bootstrap", settings.kafka.bootstrap_servers, "--set",
                           f"topics.prefix={settings.topics.prefix}", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_replay_and_simulate(kafka_settings, tmp_path):
    s = kafka_settings
    out = cli(s, "replay", str(write_alimama(tmp_path / "ali")), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "events sent" in out.stdout and "raw_sample.csv:5: clk must be 0 or 1" in out.stdout
    out = cli(s, "simulate", "--events", "3000", "--kafka", "--users", "300", "--items", "1000",
              "--categories", "10", "--rate", "20000", "--eval")
    assert out.returncode == 0, out.stderr
    assert "oracle AUC" in out.stdout and "3,000" in out.stdout
    got = consume_all(s, 8 + 3000)
    assert sum(len(v) for v in got.values()) == 8 + 3000


def test_cli_without_broker_fails_with_a_message(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("user_id,item_id,category_id,ts\n1,1,1,1700000002\n")
    out = subprocess.run([*BIN, "--bootstrap", "127.0.0.1:1", "replay", str(f), "--connect-timeout", "1"],
                         capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "cannot reach Kafka" in out.stderr


def test_cli_strict_and_file_output(tmp_path):
    ali = write_alimama(tmp_path / "ali")
    out = subprocess.run([*BIN, "replay", str(ali), "--strict", "--out", str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "raw_sample.csv:5" in out.stderr
    out = subprocess.run([*BIN, "replay", str(ali), "--out", str(tmp_path / "o.jsonl"), "--limit", "3",
                          "--no-progress"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and len((tmp_path / "o.jsonl").read_text().splitlines()) == 3
