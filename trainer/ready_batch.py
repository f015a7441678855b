"""A mini-batch ready to learn, and its bytes on the way from the prefetch process to the trainer.

The prefetch process (``trainer/prefetch.py``) decodes and assembles each batch; what crosses to
the trainer is numpy arrays, the sample ids and the Kafka offsets the batch completes. They travel
as msgpack (msgspec): the arrays as raw bytes with dtype and shape, decoded into writable buffers
so torch takes them without a copy (multiprocessing's queue only wraps those bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import msgspec
import numpy as np

from trainer.features import Batch, columns_to_batch, samples_to_batch
from trainer.sample_decode import DecodedSamples


@dataclass
class ReadyBatch:
    """One mini-batch: its model input (None when every message of it was dead-lettered), the ids
    and event times of its samples, and the offsets that learning it completes."""

    sample_ids: list[str]
    ts: np.ndarray  # (B,) int64 event times
    batch: Batch | None
    offsets: dict[int, int]  # partition -> next offset after this batch's records
    topic_id: str | None = None  # the samples topic those offsets belong to
    dead_letters: dict[str, int] = field(default_factory=dict)  # reason kind -> messages refused

    @classmethod
    def of_samples(cls, samples: Sequence[Any], offsets: dict[int, int], settings: Any,
                   topic_id: str | None = None, dead_letters: dict[str, int] | None = None) -> "ReadyBatch":
        """From samples decoded message by message (:class:`~dmrstream.contracts.Sample`)."""
        ts = np.fromiter((s.ts for s in samples), dtype=np.int64, count=len(samples))
        batch = samples_to_batch(samples, settings) if samples else None
        return cls([s.sample_id for s in samples], ts, batch, offsets, topic_id, dict(dead_letters or {}))

    @classmethod
    def of_columns(cls, decoded: DecodedSamples, offsets: dict[int, int], settings: Any,
                   topic_id: str | None = None) -> "ReadyBatch":
        """From a batch decoded column-wise (``trainer/sample_decode.py``)."""
        return cls(decoded.sample_ids, decoded.ts, columns_to_batch(decoded.columns, settings), offsets, topic_id)


class _Array(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    data: bytearray  # writable, so torch.from_numpy takes it as it is


class _Wire(msgspec.Struct, omit_defaults=True):
    sample_ids: list[str]
    ts: _Array
    batch: dict[str, _Array] | None  # Batch's fields that are set
    offsets: dict[int, int]
    topic_id: str | None = None
    dead_letters: dict[str, int] = {}


_DECODER = msgspec.msgpack.Decoder(_Wire)
_ENCODER = msgspec.msgpack.Encoder()


def _wire_array(a: np.ndarray) -> _Array:
    a = np.ascontiguousarray(a)
    return _Array(a.dtype.str, list(a.shape), bytearray(a.data))


def _array(w: _Array) -> np.ndarray:
    return np.frombuffer(w.data, dtype=np.dtype(w.dtype)).reshape(w.shape)


def encode_ready(rb: ReadyBatch) -> bytes:
    """The bytes of ``rb`` for :func:`decode_ready`."""
    batch = None
    if rb.batch is not None:
        batch = {f.name: _wire_array(getattr(rb.batch, f.name)) for f in fields(Batch)
                 if getattr(rb.batch, f.name) is not None}
    return _ENCODER.encode(_Wire(rb.sample_ids, _wire_array(rb.ts), batch, rb.offsets, rb.topic_id, rb.dead_letters))


def decode_ready(data: bytes) -> ReadyBatch:
    """The batch :func:`encode_ready` wrote."""
    w = _DECODER.decode(data)
    batch = Batch(**{name: _array(a) for name, a in w.batch.items()}) if w.batch is not None else None
    return ReadyBatch(w.sample_ids, _array(w.ts), batch, w.offsets, w.topic_id, w.dead_letters)
