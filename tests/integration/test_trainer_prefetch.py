"""The trainer's prefetch process on the local broker: it reads every good sample once in
offset order, dead-letters the bad ones (counted in the trainer's process), stops at once with a
full queue, a prefetch process that dies makes the trainer fail loudly instead of waiting, and the
trainer's checkpointed offsets reach its consumer group."""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition
from prometheus_client import REGISTRY

from dmrstream.contracts import encode
from dmrstream.kafkaio import create_topics, make_consumer, make_producer
from dmrstream.settings import load_settings
from pipeline_reference import random_samples
from trainer.prefetch import Prefetch, PrefetchFailed, trainer_group

pytestmark = pytest.mark.slow

BAD = [b"not a sample", b'{"schema": 1}', b"\xff\xfe"]


def _produce(s, values: list[bytes]) -> None:
    p = make_producer(s)
    for v in values:
        p.send(s.topics.name("samples"), key=b"u", value=v, partition=0)  # offset order is stream order
    p.flush()
    p.close()


def _dead_lettered(s) -> float:
    """This process's dead-letter count for the trainer's samples, over every reason kind."""
    return sum(x.value for m in REGISTRY.collect() if m.name == "dmrstream_dead_letters" for x in m.samples
               if x.name.endswith("_total") and x.labels.get("component") == "trainer"
               and x.labels.get("topic") == s.topics.name("samples"))


def test_prefetch_hands_over_every_good_sample_once_and_dead_letters_the_bad(kafka_settings):
    s = kafka_settings
    create_topics(s)
    good = random_samples(150, seed=11)
    values = [encode(x) for x in good]
    for i, bad in enumerate(BAD):  # one bad message in the 2nd, 3rd and 4th batch of 32
        values.insert(40 + 32 * i, bad)
    _produce(s, values)
    before = _dead_lettered(s)
    ids, batches = [], []
    with Prefetch(s, {}, 32, 0.2) as pre:
        deadline = time.monotonic() + 60
        while len(ids) < len(good) and time.monotonic() < deadline:
            rb = pre.get(timeout=1.0)
            if rb is not None:
                ids += rb.sample_ids
                batches.append(rb)
    assert ids == [x.sample_id for x in good]  # all, once, in offset order
    ts_of = {x.sample_id: x.ts for x in good}
    for rb in batches:
        assert len(rb.ts) == len(rb.sample_ids) == len(rb.batch)
        assert rb.batch.hist_item.flags.writeable and rb.batch.hist_item.shape == (len(rb.sample_ids), s.features.seq_len)
        assert np.array_equal(rb.ts, [ts_of[sid] for sid in rb.sample_ids])
    assert batches[-1].offsets == {0: len(values)}
    assert sum(sum(rb.dead_letters.values()) for rb in batches) == len(BAD)
    assert _dead_lettered(s) - before == len(BAD)  # counted in this process, whose metrics are served
    c = make_consumer(s, None, [])
    tp = TopicPartition(s.topics.name("dead_letters"), 0)
    parts = [TopicPartition(tp.topic, p) for p in range(s.topics.partitions)]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    dead, end = [], time.monotonic() + 10
    while len(dead) < len(BAD) and time.monotonic() < end:
        for recs in c.poll(300).values():
            dead += recs
    c.close()
    assert len(dead) == len(BAD)


def test_offsets_sent_just_before_a_stop_reach_the_group(kafka_settings):
    """The trainer's last checkpoint comes right before it closes the prefetch process: those
    offsets are committed to the group all the same."""
    from dmrstream.kafkaio import make_admin

    s = kafka_settings
    create_topics(s)
    _produce(s, [encode(x) for x in random_samples(40, seed=15)])
    with Prefetch(s, {}, 64, 0.2) as pre:
        rb = None
        deadline = time.monotonic() + 30
        while rb is None and time.monotonic() < deadline:
            rb = pre.get(timeout=1.0)
        assert rb is not None and rb.offsets == {0: 40}
        pre.commit_learned({0: 25}, rb.topic_id)  # then at once the stop
    admin = make_admin(s)
    try:
        group = admin.list_group_offsets({trainer_group(s): None})[trainer_group(s)]
    finally:
        admin.close()
    assert {tp.partition: om.offset for tp, om in group.items()} == {0: 25}


def test_prefetch_starts_at_the_given_offsets(kafka_settings):
    s = kafka_settings
    create_topics(s)
    good = random_samples(40, seed=12)
    _produce(s, [encode(x) for x in good])
    with Prefetch(s, {0: 25}, 64, 0.2) as pre:
        rb = None
        deadline = time.monotonic() + 30
        while rb is None and time.monotonic() < deadline:
            rb = pre.get(timeout=1.0)
    assert rb is not None and rb.sample_ids == [x.sample_id for x in good[25:]]


def test_prefetch_stops_at_once_while_its_queue_is_full(kafka_settings):
    """The optimizer gone (queue full, nobody reading): a stop still ends the process promptly,
    so `dmrstream trainer` does not hang on shutdown."""
    s = kafka_settings
    create_topics(s)
    _produce(s, [encode(x) for x in random_samples(200, seed=13)])
    pre = Prefetch(s, {}, 16, 0.1, queue_size=1).start()
    deadline = time.monotonic() + 60
    while not pre.full() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pre.full()
    time.sleep(0.5)
    assert pre.process.is_alive()  # waiting to hand over the next batch
    t = time.monotonic()
    pre.close(timeout=10)
    assert time.monotonic() - t < 3
    assert pre.process.exitcode == 0  # ended by itself, not killed


def test_a_dead_prefetch_process_fails_the_trainer_loudly(kafka_settings):
    s = kafka_settings
    create_topics(s)
    pre = Prefetch(s, {}, 32, 0.1).start()
    try:
        assert pre.get(timeout=0.5) is None  # nothing to read yet: alive and waiting
        os.kill(pre.process.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
        with pytest.raises(PrefetchFailed, match="code -9"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pre.get(timeout=0.2)
    finally:
        pre.close()


def test_the_prefetch_process_gets_the_settings_whole_secrets_included():
    """The settings' JSON form masks secrets: the child must get them as they are (a SASL login)."""
    s = load_settings(overrides={"kafka.sasl_plain_username": "u", "kafka.sasl_plain_password": "s3cret"})
    pre = Prefetch(s, {0: 3}, 32, 0.1, "topic-id")
    job = pickle.loads(pickle.dumps(pre.job))  # what multiprocessing's spawn does with the process's args
    assert job.settings == s and job.settings.kafka.sasl_plain_password.get_secret_value() == "s3cret"
    assert (job.start_offsets, job.start_topic_id, job.batch_size, job.parent_pid) == ({0: 3}, "topic-id", 32, os.getpid())


def test_the_trainer_commits_its_checkpointed_offsets_to_its_group(kafka_settings):
    """Resuming reads the checkpoint; the group `<prefix>trainer` shows the same offsets to Kafka's
    tools and to the lag gauge (monitoring/lag.py)."""
    from dmrstream.kafkaio import make_admin
    from monitoring.lag import LagMonitor
    from trainer.checkpoint import load_checkpoint
    from trainer.service import run

    s = load_settings(overrides={
        "kafka.bootstrap_servers": kafka_settings.kafka.bootstrap_servers, "topics.prefix": kafka_settings.topics.prefix,
        "state_dir": kafka_settings.state_dir, "model_store": kafka_settings.model_store,
        "model.item_vocab_size": 4096, "model.user_vocab_size": 4096, "model.category_vocab_size": 256,
        "model.aux_negatives": 32, "model.batch_size": 32, "trainer.max_wait_ms": 50})
    create_topics(s)
    good = random_samples(200, seed=14)
    p = make_producer(s)
    for x in good:
        p.send(s.topics.name("samples"), key=str(x.user_id).encode(), value=encode(x))
    p.flush()
    p.close()
    trainer = run(s, "dmr", "cpu", max_seconds=8)
    assert trainer.samples_seen == len(good)
    checkpointed = {int(k): v for k, v in load_checkpoint(Path(s.state_dir) / "trainer" / "checkpoints")[2]["offsets"].items()}
    assert sum(checkpointed.values()) == len(good) and checkpointed == trainer.offsets
    admin = make_admin(s)
    try:
        group = admin.list_group_offsets({trainer_group(s): None})[trainer_group(s)]
    finally:
        admin.close()
    assert {tp.partition: om.offset for tp, om in group.items() if tp.topic == s.topics.name("samples")} == checkpointed
    lag = LagMonitor(s)
    try:
        seen = lag.poll()
    finally:
        lag.close()
    assert {p for (g, t, p) in seen if g == trainer_group(s) and t == s.topics.name("samples")} == set(checkpointed)
