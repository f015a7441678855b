"""A ready batch's bytes (the prefetch process -> the trainer) give back the same batch: every
array with its dtype, shape and values, writable for torch; ids, times, offsets, dead letters."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from dmrstream.settings import load_settings
from pipeline_reference import random_samples
from trainer.features import Batch
from trainer.ready_batch import ReadyBatch, decode_ready, encode_ready


def test_a_batch_survives_its_bytes_exactly():
    s = load_settings()
    rb = ReadyBatch.of_samples(random_samples(50, seed=2), {0: 17, 3: 90}, s, "topic-id-1", {"invalid": 2})
    back = decode_ready(encode_ready(rb))
    assert back.sample_ids == rb.sample_ids and back.offsets == {0: 17, 3: 90}
    assert back.topic_id == "topic-id-1" and back.dead_letters == {"invalid": 2}
    assert back.ts.dtype == np.int64 and np.array_equal(back.ts, rb.ts)
    for f in fields(Batch):
        a, b = getattr(rb.batch, f.name), getattr(back.batch, f.name)
        if a is None:
            assert b is None, f.name
            continue
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), f.name
        assert b.flags.writeable, f.name  # torch.from_numpy without a copy or a warning


def test_a_batch_whose_messages_were_all_dead_lettered_has_no_model_input():
    rb = ReadyBatch.of_samples([], {1: 5}, load_settings(), None, {"parse": 3})
    back = decode_ready(encode_ready(rb))
    assert back.batch is None and back.sample_ids == [] and len(back.ts) == 0
    assert back.offsets == {1: 5} and back.dead_letters == {"parse": 3} and back.topic_id is None
