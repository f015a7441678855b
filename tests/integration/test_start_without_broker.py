"""Roles started before their broker: `dmrstream streamer|trainer|scorer`, run as the README says,
against a loopback port where nothing listens yet. Each says it is waiting (and for which
address), stops at once and cleanly on SIGTERM/SIGINT while waiting, and, when a real local
broker appears on that port later, gets on with its work."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import TopicPartition

from dmrstream.broker import LocalBroker, free_port
from dmrstream.contracts import Candidate, Click, Codec, Impression, Sample, Score, ScoreRequest, encode
from dmrstream.kafkaio import create_topics, make_consumer, make_producer
from dmrstream.settings import load_settings
from pipeline_reference import random_samples
from trainer.service import learned_ids

pytestmark = pytest.mark.slow

ROLES = ("streamer", "trainer", "scorer")
WAITING = "waiting for the Kafka broker at 127.0.0.1:{port}"
_SCRIPT = Path(sys.executable).with_name("dmrstream")  # the console script the README runs
DMRSTREAM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dmrstream"]
# Small model tables (fast start on 2 cores), one partition (a topic a client makes the broker
# auto-create before `create_topics` runs gets the right count), quick checkpoints.
SETS = {"topics.partitions": 1, "kafka.session_timeout_ms": 6000, "model.item_vocab_size": 4096,
        "model.user_vocab_size": 4096, "model.category_vocab_size": 256, "model.aux_negatives": 32,
        "model.batch_size": 32, "trainer.max_wait_ms": 50, "trainer.checkpoint_every_s": 0.5,
        "metrics.streamer_port": 0, "metrics.trainer_port": 0, "metrics.scorer_port": 0}


def crash_tracebacks(log_text: str) -> list[str]:
    """Tracebacks in a role's output other than those kafka-python logs itself at ERROR for a
    connection it handles and closes (seen once in CI: a socket closed under a recv during
    shutdown). Our roles must never print one; the exit code is checked separately."""
    lines, out = log_text.splitlines(), []
    for k, line in enumerate(lines):
        if line.startswith("Traceback") and not (k and " ERROR kafka." in lines[k - 1]):
            out.append("\n".join(lines[max(0, k - 1):k + 8]))
    return out


def _settings(port: int, tmp_path: Path):
    return load_settings(overrides={"kafka.bootstrap_servers": f"127.0.0.1:{port}",
                                    "topics.prefix": f"sw{uuid.uuid4().hex[:6]}.", "state_dir": str(tmp_path / "state"),
                                    "model_store": str(tmp_path / "models"), **SETS})


def _start(role: str, s, log: Path) -> subprocess.Popen:
    args = [*DMRSTREAM, "--bootstrap", s.kafka.bootstrap_servers, "--log-level", "INFO",
            "--set", f"topics.prefix={s.topics.prefix}", "--set", f"state_dir={s.state_dir}/{role}",
            "--set", f"model_store={s.model_store}"]
    for k, v in SETS.items():
        args += ["--set", f"{k}={v}"]
    args.append(role)
    if role == "trainer":
        args += ["--device", "cpu"]
    # stderr to a file: a pipe nobody reads while the role runs could fill up and block it.
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), stdin=subprocess.DEVNULL)


def _wait_for(what: str, check, proc: subprocess.Popen | None = None, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc is None or proc.poll() is None, f"exited with {proc.returncode} before: {what}"
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.1)


class _Topic:
    """What a one-partition topic holds so far, decoded (read from its beginning)."""

    def __init__(self, s, name: str, kind: type):
        self.consumer = make_consumer(s, None, [])
        self.consumer.assign([TopicPartition(s.topics.name(name), 0)])
        self.consumer.seek_to_beginning()
        self.codec, self.got = Codec(kind), []

    def poll(self) -> list:
        for recs in self.consumer.poll(timeout_ms=200).values():
            self.got += [self.codec.decode(r.value) for r in recs]
        return self.got


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> float:
    """Send ``sig``; the seconds until the process exited."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - sent


@pytest.mark.parametrize("role,sig", [("streamer", signal.SIGTERM), ("trainer", signal.SIGTERM),
                                      ("scorer", signal.SIGTERM), ("scorer", signal.SIGINT)])
def test_signal_while_waiting_for_the_broker_stops_cleanly(role, sig, tmp_path):
    port = free_port()
    log = tmp_path / f"{role}.log"
    proc = _start(role, _settings(port, tmp_path), log)
    try:
        _wait_for("the waiting line", lambda: WAITING.format(port=port) in log.read_text(), proc)
        time.sleep(1.0)  # into the back-off between probes
        took = _stop(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert took < 3.0, f"{role} took {took:.1f} s to stop"
    assert not crash_tracebacks(err), err[-3000:]
    assert f"stopped while waiting for the Kafka broker at 127.0.0.1:{port}" in err


def test_roles_started_before_the_broker_proceed_when_it_appears(tmp_path):
    port = free_port()
    s = _settings(port, tmp_path)
    logs = {role: tmp_path / f"{role}.log" for role in ROLES}
    procs = {role: _start(role, s, logs[role]) for role in ROLES}
    try:
        for role in ROLES:
            _wait_for(f"{role} waiting", lambda: WAITING.format(port=port) in logs[role].read_text(), procs[role])
        time.sleep(2.0)  # the roles are in their back-off when the broker turns up
        with LocalBroker(port=port, log_file=tmp_path / "tansu.log"):
            create_topics(s, replace_mismatched=True)  # what `dmrstream broker` does on start

            # Streamer: an impression and its click come out as a positive sample once later
            # events on both inputs carry the watermark past its attribution window.
            p = make_producer(s)
            t0 = 1_700_000_000_000
            later = t0 + s.join.attribution_window_ms + 1000
            for topic, e in [("impressions", Impression(event_id="i1", user_id=7, item_id=3, category_id=1, ts=t0,
                                                        request_id="r1")),
                             ("clicks", Click(event_id="c1", user_id=7, item_id=3, category_id=1, ts=t0 + 500,
                                              request_id="r1")),
                             ("impressions", Impression(event_id="i2", user_id=7, item_id=4, category_id=1,
                                                        ts=later, request_id="r2")),
                             ("clicks", Click(event_id="c2", user_id=7, item_id=5, category_id=1, ts=later))]:
                p.send(s.topics.name(topic), key=b"7", value=encode(e))
            # Trainer: samples to learn (a different id space from the streamer's); it then
            # publishes v1, which the scorer loads before it answers this request.
            samples = random_samples(64)
            for smp in samples:
                p.send(s.topics.name("samples"), key=str(smp.user_id).encode(), value=encode(smp))
            p.send(s.topics.name("score_requests"), key=b"7", value=encode(ScoreRequest(
                request_id="q1", user_id=7, candidates=[Candidate(item_id=3, category_id=1)], ts=t0 + 2000)))
            p.flush()
            p.close()

            out, scores = _Topic(s, "samples", Sample), _Topic(s, "scores", Score)
            _wait_for("the streamer's positive sample for i1",
                      lambda: any(x.event_id == "i1" and x.label == 1 for x in out.poll()), procs["streamer"])
            ids = {x.sample_id for x in samples}
            _wait_for("the trainer learning every sample", lambda: ids <= set(learned_ids(f"{s.state_dir}/trainer")),
                      procs["trainer"])
            _wait_for("the scorer answering q1 with a published model",
                      lambda: any(x.request_id == "q1" and x.model_version >= 1 for x in scores.poll()),
                      procs["scorer"])
            out.consumer.close()
            scores.consumer.close()
            for role in ROLES:
                assert "answers after" in logs[role].read_text(), role
                _stop(procs[role])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for role in ROLES:
        err = logs[role].read_text()
        assert procs[role].returncode == 0, f"{role}: {err[-3000:]}"
        assert not crash_tracebacks(err), f"{role}: {err[-3000:]}"
