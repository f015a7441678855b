"""`dmrstream scorer` on the local broker: every request answered exactly once on `scores`, a new
version announced on model-updates is swapped in, hostile messages are dead-lettered, and served
scores joined with labels from `samples` give the serving AUC per version."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from dmrstream.contracts import Codec, Impression, Sample, Score, encode  # noqa: E402
from dmrstream.kafkaio import create_topics, make_consumer, make_producer  # noqa: E402
from test_scoring_helpers import SMALL, T0, FastPublisher, request  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def _collect(consumer, want: set[str], timeout: float) -> list[Score]:
    codec, out = Codec(Score), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want <= {s.request_id for s in out}:
        for recs in consumer.poll(timeout_ms=200).values():
            out += [codec.decode(r.value) for r in recs]
    return out


def test_scorer_role_answers_swaps_and_measures_serving_auc(kafka_settings):
    s = kafka_settings.model_copy(update={"model": kafka_settings.model.model_copy(update={
        k.split(".")[1]: v for k, v in SMALL.items() if k.startswith("model.")})})
    create_topics(s)
    pub = FastPublisher(s)
    producer = make_producer(s)
    updates = s.topics.name("model_updates")
    producer.send(updates, key=b"model", value=encode(pub.next("full"))).get(10)
    port = _free_port()
    args = [sys.executable, "-m", "dmrstream", "--bootstrap", s.kafka.bootstrap_servers, "--log-level", "WARNING",
            "--set", f"topics.prefix={s.topics.prefix}", "--set", f"state_dir={s.state_dir}",
            "--set", f"model_store={s.model_store}", "--set", "kafka.session_timeout_ms=6000"]
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(args + ["scorer", "--metrics-port", str(port)], stderr=subprocess.PIPE, text=True)
    scores = make_consumer(s, None, [s.topics.name("scores")])
    try:
        reqs = [request(i, n=1 + i % 30) for i in range(100)]
        for q in reqs:
            producer.send(s.topics.name("score_requests"), key=str(q.user_id).encode(), value=encode(q))
        producer.send(s.topics.name("score_requests"), key=b"1", value=b'{"schema": 1, "request_id": 5}')
        producer.flush()
        first = _collect(scores, {q.request_id for q in reqs}, 90)
        assert sorted(x.request_id for x in first) == sorted(q.request_id for q in reqs)  # once each
        assert {x.model_version for x in first} == {1}
        assert all(len(x.scores) == len(q.candidates) for x, q in
                   zip(sorted(first, key=lambda x: x.request_id), sorted(reqs, key=lambda q: q.request_id)))

        producer.send(updates, key=b"model", value=encode(pub.next("delta"))).get(10)
        later = [request(1000 + i, n=3) for i in range(200)]
        for q in later:
            producer.send(s.topics.name("score_requests"), key=str(q.user_id).encode(), value=encode(q))
            time.sleep(0.01)
        producer.flush()
        second = _collect(scores, {q.request_id for q in later}, 60)
        assert sorted(x.request_id for x in second) == sorted(q.request_id for q in later)
        assert second[-1].model_version == 2 and {x.model_version for x in second} <= {1, 2}

        # impressions of those answers, then their labels: serving AUC for v2
        served = [x for x in second if x.model_version == 2]
        for k, x in enumerate(served):
            imp = Impression(event_id=f"imp{k}", user_id=x.user_id, item_id=x.scores[0].item_id, category_id=0,
                             ts=T0 + 20_000_000 + k, request_id=x.request_id)
            producer.send(s.topics.name("impressions"), key=str(x.user_id).encode(), value=encode(imp))
        producer.flush()
        time.sleep(2)
        for k, x in enumerate(served):
            smp = Sample(sample_id=f"imp{k}", event_id=f"imp{k}", user_id=x.user_id, item_id=x.scores[0].item_id,
                         category_id=0, ts=T0 + 20_000_000 + k, label=k % 2)
            producer.send(s.topics.name("samples"), key=str(x.user_id).encode(), value=encode(smp))
        producer.flush()
        deadline = time.monotonic() + 30
        labelled = {}
        while time.monotonic() < deadline and labelled.get('dmrstream_serving_labelled{version="2"}') != len(served):
            time.sleep(0.5)
            labelled = _metric(port, "dmrstream_serving_labelled")
        assert labelled.get('dmrstream_serving_labelled{version="2"}') == len(served)
        assert 'dmrstream_serving_auc{version="2"}' in _metric(port, "dmrstream_serving_auc")
        dead = _metric(port, "dmrstream_dead_letters_total")
        assert sum(v for k, v in dead.items() if "score-requests" in k) == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        scores.close()
        producer.close()
    assert proc.returncode == 0, err[-2000:]
    assert "scorer stopped" not in err  # the summary goes to stdout
