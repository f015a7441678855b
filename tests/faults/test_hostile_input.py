"""Hostile input on every topic a component reads, through the real local broker, with the real
component running as a subprocess (`dmrstream streamer | trainer | scorer`).

Per topic, 1,000 generated bad messages (``tests/faults/hostile.py``: malformed JSON, wrong
types, oversized ones, two of them ~10 MB, deep nesting, NaN/inf, bad ids, invalid UTF-8, far
timestamps, unknown schema versions, empty/null values, unknown fields, contract violations) are
interleaved with good events and duplicates of good events. Each test asserts that

* every bad message is in ``dead-letters`` exactly once (matched by source topic, partition and
  offset) with the reason the strict decoder gives it, the component's name and its bytes;
* nothing else is dead-lettered, and duplicates are not dead letters (they change nothing);
* the component is still alive at the end and exits 0 on SIGTERM;
* every good event was processed correctly: the streamer's samples have the right labels (one per
  impression) and its RocksDB feature store holds exactly the reference sequences; the trainer
  learned exactly the good sample ids, once each; the scorer answered every good request exactly
  once and nothing else.

The measured figures of a run are appended to ``$DMRSTREAM_FAULT_FIGURES`` when it is set (see
``tests/faults/FIGURES.md``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from kafka import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmrstream.contracts import (DEAD_LETTER_MAX_KEY, Click, Codec, ContractError, Impression, ModelUpdate, Sample, Score,  # noqa: E402
                                 ScoreRequest, decode_dead_letter, encode)
from dmrstream.kafkaio import create_topics, make_consumer, make_producer  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from hostile import (Msg, good_impressions_and_clicks, good_requests,  # noqa: E402
                     hostile, interleave)
from pipeline_reference import partition_of, random_samples, reference_sequences, store_mismatches  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

N_BAD = 1000
CONTRACTS = {"impressions": Impression, "clicks": Click, "samples": Sample, "score_requests": ScoreRequest,
             "model_updates": ModelUpdate}


# -- helpers ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(broker, tmp_path, name: str, **extra):
    return load_settings(overrides={
        "kafka.bootstrap_servers": broker.bootstrap, "kafka.session_timeout_ms": 6000,
        "topics.prefix": f"{name}{uuid.uuid4().hex[:6]}.", "state_dir": str(tmp_path / "state"),
        "model_store": str(tmp_path / "models"), **extra})


def _cli(s, sets: dict, role: list[str]) -> list[str]:
    args = [sys.executable, "-m", "dmrstream", "--bootstrap", s.kafka.bootstrap_servers, "--log-level", "WARNING",
            "--set", f"topics.prefix={s.topics.prefix}", "--set", f"state_dir={s.state_dir}",
            "--set", f"model_store={s.model_store}", "--set", "kafka.session_timeout_ms=6000"]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
    return args + role


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def _stop(proc: subprocess.Popen, log: Path) -> int:
    """SIGTERM and the exit code (the process must stop by itself within 60 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"did not stop on SIGTERM: {log.read_text()[-2000:]}") from None


def _produce(s, topic: str, msgs: list[Msg]) -> list[tuple[Msg, int, int]]:
    """Send in order; returns (message, partition, offset) of each. The producer accepts ~10 MB
    records (the broker does too), far above what the components' contract allows."""
    p = make_producer(s, max_request_size=12 * 1024 * 1024)
    futures = [(m, p.send(topic, key=m.key, value=m.value)) for m in msgs]
    p.flush(120)
    out = [(m, f.get(60).partition, f.get(60).offset) for m, f in futures]
    p.close()
    return out


class TopicReader:
    """Reads every partition of a topic from the beginning."""

    def __init__(self, s, logical: str):
        name = s.topics.name(logical)
        self.c = make_consumer(s, None, [], max_partition_fetch_bytes=16 * 1024 * 1024)
        parts = self.c.partitions_for_topic(name) or set(range(s.topics.partitions))
        self.c.assign([TopicPartition(name, p) for p in sorted(parts)])
        self.c.seek_to_beginning()
        self.records: list = []

    def read(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for recs in self.c.poll(200).values():
                self.records += recs

    def until(self, done, timeout: float, settle: float = 2.0) -> None:
        """Read until ``done(records)`` holds (then ``settle`` s more, to catch extra copies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(self.records):
            self.read(0.5)
        self.read(settle)

    def close(self) -> None:
        self.c.close()


def _check_dead_letters(dead_records: list, sent: list[tuple[Msg, int, int]], topic: str, contract, limits,
                        component: str) -> dict:
    """Every bad message dead-lettered exactly once with the decoder's reason; nothing else."""
    codec = Codec(contract, limits)
    envelopes = defaultdict(list)
    for r in dead_records:
        env = decode_dead_letter(r.value)
        envelopes[(env.source_topic, env.partition, env.offset)].append(env)
    bad = {(topic, part, off): m for m, part, off in sent if m.bad is not None}
    ours = {k: v for k, v in envelopes.items() if k[0] == topic}
    missing = sorted(set(bad) - set(ours))
    extra = sorted(set(ours) - set(bad))
    assert not missing, f"{len(missing)} bad messages not dead-lettered, e.g. {[bad[k].bad.kind for k in missing[:5]]}"
    assert not extra, f"{len(extra)} good messages dead-lettered, e.g. {[ours[k][0].reason for k in extra[:5]]}"
    twice = [k for k, v in ours.items() if len(v) != 1]
    assert not twice, f"{len(twice)} dead-lettered more than once"
    kinds = Counter()
    for k, m in bad.items():
        env = ours[k][0]
        with pytest.raises(ContractError) as e:
            codec.decode(m.value)
        assert env.reason == e.value.reason, (m.bad.kind, env.reason)
        assert env.reason.split(":")[0] in m.bad.reasons
        assert env.component == component
        original = m.value or b""
        if env.truncated:  # oversized originals or keys keep their head; the envelope says how long
            assert env.original_bytes == len(original) and original.startswith(env.original)
            assert len(env.original) < len(original) or len(m.key) > DEAD_LETTER_MAX_KEY
        else:
            assert env.original == original
        assert env.key == m.key[:DEAD_LETTER_MAX_KEY]
        kinds[m.bad.kind] += 1
    return kinds


def _record(figures: dict) -> None:
    path = os.environ.get("DMRSTREAM_FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


def _metric(port: int, prefix: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix)}


# -- the generator itself (pure) -------------------------------------------------------------
@pytest.mark.parametrize("topic", list(CONTRACTS))
def test_every_generated_message_is_refused_by_the_decoder(topic):
    """Guards the generator: each bad message really violates the contract, with the reason its
    kind announces; same seed, same bytes."""
    bad = hostile(topic, N_BAD, seed=0)
    assert len(bad) == N_BAD and {b.kind for b in bad} == set(__import__("hostile").KINDS)
    assert sum(1 for b in bad if b.value is not None and len(b.value) >= 10 * 1024 * 1024) == 2
    codec = Codec(CONTRACTS[topic])
    for b in bad:
        with pytest.raises(ContractError) as e:
            codec.decode(b.value)
        assert e.value.reason.split(":")[0] in b.reasons, (b.kind, e.value.reason)
    assert [b.value for b in hostile(topic, 50, seed=0)] == [b.value for b in bad[:50]]


# -- streamer: impressions and clicks --------------------------------------------------------
W = 60_000


def test_streamer_dead_letters_hostile_impressions_and_clicks(broker, tmp_path):
    started = time.monotonic()
    parts = 2
    s = _settings(broker, tmp_path, "hs", **{"topics.partitions": parts, "join.attribution_window_ms": W,
                                             "metrics.streamer_port": 0})
    create_topics(s)
    events = good_impressions_and_clicks(500, seed=11)
    # A tail on every partition, far past the stream (a clicked impression: label 1), then a flush
    # further on: the merge and the join watermark pass every good impression's window (the tail's
    # too), so each one is settled; the flush's own impressions stay pending.
    end = max(e.ts for e in events) + 10 * W
    users = {}
    for u in range(1000, 2000):
        users.setdefault(partition_of(u, parts), u)
        if len(users) == parts:
            break
    flush = []
    for p, u in users.items():
        events.append(Impression(event_id=f"tail-i{p}", user_id=u, item_id=1, category_id=1, ts=end,
                                 request_id=f"tail-r{p}"))
        events.append(Click(event_id=f"tail-c{p}", user_id=u, item_id=1, category_id=1, ts=end,
                            request_id=f"tail-r{p}"))
        flush.append(Impression(event_id=f"flush-i{p}", user_id=u, item_id=2, category_id=1, ts=end + 10 * W))
        flush.append(Click(event_id=f"flush-c{p}", user_id=u, item_id=3, category_id=1, ts=end + 10 * W))
    impressions = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    key = lambda e: str(e.user_id).encode()  # noqa: E731
    msgs = {"impressions": interleave(impressions, hostile("impressions", N_BAD, seed=1), key, seed=1),
            "clicks": interleave(clicks, hostile("clicks", N_BAD, seed=2), key, seed=2)}
    for e in flush:  # last on their partitions
        msgs["impressions" if isinstance(e, Impression) else "clicks"].append(Msg(key(e), encode(e), event=e))
    clicks += [e for e in flush if isinstance(e, Click)]  # the store holds them too
    log = tmp_path / "streamer.log"
    proc = _start(_cli(s, {"topics.partitions": parts, "join.attribution_window_ms": W},
                       ["streamer", "--metrics-port", "0"]), log)
    try:
        # clicks first (late-arriving impressions are the harder case for the merge)
        sent = {t: _produce(s, s.topics.name(t), msgs[t]) for t in ("clicks", "impressions")}
        produced_at = time.monotonic()
        samples, dead = TopicReader(s, "samples"), TopicReader(s, "dead_letters")
        n_bad = sum(1 for t in sent.values() for m, _, _ in t if m.bad)
        samples.until(lambda rs: len({Codec(Sample).decode(r.value).sample_id for r in rs}) >= len(impressions), 150)
        dead.until(lambda rs: len(rs) >= n_bad, 60)
        processed_at = time.monotonic()
        assert proc.poll() is None, f"streamer died: {log.read_text()[-3000:]}"
    finally:
        rc = _stop(proc, log)
    assert rc == 0, log.read_text()[-3000:]

    kinds = {t: _check_dead_letters(dead.records, sent[t], s.topics.name(t), CONTRACTS[t], s.limits, "streamer")
             for t in sent}
    # every good impression: exactly one sample (duplicates change nothing), with its label
    got = [Codec(Sample).decode(r.value) for r in samples.records]
    clicked = {c.request_id for c in clicks}
    want = {i.event_id: int(i.request_id in clicked) for i in impressions}
    ids = Counter(x.sample_id for x in got)
    assert set(ids) == set(want), (len(set(want) - set(ids)), len(set(ids) - set(want)))
    assert max(ids.values()) == 1, [k for k, n in ids.items() if n > 1][:5]
    assert {x.sample_id: x.label for x in got} == want
    assert 0.2 < sum(want.values()) / len(want) < 0.6

    # the RocksDB feature store: exactly the reference sequences of the good clicks (once each)
    assert store_mismatches(s, reference_sequences(clicks, s.features.seq_len)) == []
    _record({"component": "streamer", "topics": {t: {"bad": sum(1 for m, _, _ in sent[t] if m.bad),
                                                    "dead_lettered": sum(kinds[t].values()),
                                                    "good": sum(1 for m, _, _ in sent[t] if m.event and not m.dup),
                                                    "duplicates": sum(1 for m, _, _ in sent[t] if m.dup)}
                                                for t in sent},
             "samples": len(got), "seconds_to_process": round(processed_at - produced_at, 1),
             "seconds_total": round(time.monotonic() - started, 1)})


# -- trainer: samples ------------------------------------------------------------------------
TRAINER_SETS = {"model.item_vocab_size": 4096, "model.user_vocab_size": 4096, "model.category_vocab_size": 256,
                "model.field_vocab_size": 4096, "model.aux_negatives": 32, "model.batch_size": 32,
                "model.mlp_hidden": [64, 32], "trainer.delta_every_s": 2.0, "trainer.full_every_s": 30.0,
                "trainer.checkpoint_every_s": 0.5, "trainer.max_wait_ms": 50, "metrics.trainer_port": 0}


def test_trainer_dead_letters_hostile_samples_and_learns_the_good_ones_once(broker, tmp_path):
    from trainer.service import learned_ids

    started = time.monotonic()
    s = _settings(broker, tmp_path, "ht")
    create_topics(s)
    good = random_samples(400, seed=3)
    msgs = interleave(good, hostile("samples", N_BAD, seed=3), lambda x: str(x.user_id).encode(), seed=3)
    sent = _produce(s, s.topics.name("samples"), msgs)
    produced_at = time.monotonic()
    log = tmp_path / "trainer.log"
    proc = _start(_cli(s, TRAINER_SETS, ["trainer", "--model", "dmr", "--device", "cpu"]), log)
    dead = TopicReader(s, "dead_letters")
    want = {x.sample_id for x in good}
    try:
        deadline = time.monotonic() + 150
        while set(learned_ids(s.state_dir)) != want and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        n_bad = sum(1 for m, _, _ in sent if m.bad)
        dead.until(lambda rs: len(rs) >= n_bad, 60)
        processed_at = time.monotonic()
        assert proc.poll() is None, f"trainer died: {log.read_text()[-3000:]}"
    finally:
        rc = _stop(proc, log)
    assert rc == 0, log.read_text()[-3000:]
    learned = learned_ids(s.state_dir)
    assert len(learned) == len(set(learned)), "a sample (or its duplicate) was learned twice"
    assert set(learned) == want, (len(want - set(learned)), sorted(set(learned) - want)[:5])
    kinds = _check_dead_letters(dead.records, sent, s.topics.name("samples"), Sample, s.limits, "trainer")
    _record({"component": "trainer", "topics": {"samples": {
        "bad": sum(1 for m, _, _ in sent if m.bad), "dead_lettered": sum(kinds.values()),
        "good": len(good), "duplicates": sum(1 for m, _, _ in sent if m.dup)}},
        "learned": len(learned), "seconds_to_process": round(processed_at - produced_at, 1),
        "seconds_total": round(time.monotonic() - started, 1)})


# -- scorer: score requests ------------------------------------------------------------------
def test_scorer_dead_letters_hostile_requests_and_answers_each_good_one_once(broker, tmp_path):
    from test_scoring_helpers import SMALL, FastPublisher

    started = time.monotonic()
    s = _settings(broker, tmp_path, "hq", **SMALL)
    create_topics(s)
    pub = FastPublisher(s)
    producer = make_producer(s)
    producer.send(s.topics.name("model_updates"), key=b"model", value=encode(pub.next("full"))).get(10)
    producer.close()
    good = good_requests(300, seed=5)
    msgs = interleave(good, hostile("score_requests", N_BAD, seed=5), lambda q: str(q.user_id).encode(), seed=5)
    port = _free_port()
    log = tmp_path / "scorer.log"
    proc = _start(_cli(s, SMALL, ["scorer", "--metrics-port", str(port)]), log)
    scores, dead = TopicReader(s, "scores"), TopicReader(s, "dead_letters")
    # the scorer also reads impressions and samples (serving AUC): hostile ones there too (fewer)
    side = {t: interleave([], hostile(t, 300, seed=6, big=0, oversize=3), bytes) for t in ("impressions", "samples")}
    # ... and its model-updates input gets the full 1,000 (after the good v1 it serves)
    side["model_updates"] = interleave([], hostile("model_updates", N_BAD, seed=6), bytes)
    try:
        sent = _produce(s, s.topics.name("score_requests"), msgs)
        side_sent = {t: _produce(s, s.topics.name(t), m) for t, m in side.items()}
        produced_at = time.monotonic()
        want = {q.request_id: q for q in good}
        scores.until(lambda rs: len({Codec(Score).decode(r.value).request_id for r in rs}) >= len(want), 150)
        n_bad = sum(1 for m, _, _ in sent if m.bad) + sum(len(v) for v in side_sent.values())
        dead.until(lambda rs: len(rs) >= n_bad, 60)
        processed_at = time.monotonic()
        assert proc.poll() is None, f"scorer died: {log.read_text()[-3000:]}"
        dl_metric = _metric(port, "dmrstream_dead_letters_total")
    finally:
        rc = _stop(proc, log)
    assert rc == 0, log.read_text()[-3000:]
    got = [Codec(Score).decode(r.value) for r in scores.records]
    answers = Counter(x.request_id for x in got)
    assert set(answers) == set(want), (sorted(set(want) - set(answers))[:5], sorted(set(answers) - set(want))[:5])
    assert max(answers.values()) == 1, [k for k, n in answers.items() if n > 1][:5]  # duplicates answered once
    for x in got:
        q = want[x.request_id]
        assert x.model_version == 1 and x.user_id == q.user_id
        assert [it.item_id for it in x.scores] == [c.item_id for c in q.candidates]
        assert all(0.0 <= it.score <= 1.0 for it in x.scores)
    kinds = _check_dead_letters(dead.records, sent, s.topics.name("score_requests"), ScoreRequest, s.limits, "scorer")
    assert sum(v for k, v in dl_metric.items() if "score-requests" in k) == sum(kinds.values())
    for t, sent_t in side_sent.items():
        side_kinds = _check_dead_letters(dead.records, sent_t, s.topics.name(t), CONTRACTS[t], s.limits, "scorer")
        assert sum(side_kinds.values()) == len(sent_t)
    _record({"component": "scorer", "topics": {"score_requests": {
        "bad": sum(1 for m, _, _ in sent if m.bad), "dead_lettered": sum(kinds.values()),
        "good": len(good), "duplicates": sum(1 for m, _, _ in sent if m.dup)},
        **{t: {"bad": len(v), "dead_lettered": len(v), "good": 0, "duplicates": 0} for t, v in side_sent.items()}},
        "answered": len(got), "seconds_to_process": round(processed_at - produced_at, 1),
        "seconds_total": round(time.monotonic() - started, 1)})


def test_dead_letter_envelope_of_an_oversized_message_fits_a_producer_request():
    """A 10 MB original (or key) must not make the envelope itself unproducible: its head is kept,
    with the full length; small originals travel whole."""
    from dmrstream.contracts import DEAD_LETTER_MAX_ORIGINAL, dead_letter

    big = b"x" * (10 * 1024 * 1024)
    env = dead_letter("size: too big", big, "trainer", topic="t", partition=1, offset=7, key=b"k" * 100_000)
    assert len(env) < 1_000_000
    d = decode_dead_letter(env)
    assert d.truncated and d.original_bytes == len(big) and d.original == big[:DEAD_LETTER_MAX_ORIGINAL]
    assert d.key == b"k" * 4096 and (d.source_topic, d.partition, d.offset) == ("t", 1, 7)
    small = decode_dead_letter(dead_letter("malformed: x", b"{bad", "scorer", key=b"1"))
    assert small.original == b"{bad" and not small.truncated and small.original_bytes is None
