"""The safetensors reader that builds tensors as views of the file's buffer (trainer/tensorfile.py):
the library's own files read back exactly; malformed headers are refused like the library does."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.tensorfile import TensorFileError, read_file, tensors_of


def _buf(data: bytes) -> torch.Tensor:
    return read_file(io.BytesIO(data), len(data))


def _file(header: dict, data: bytes, pad_to: int = 1) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def test_library_files_read_back_exactly_as_views_of_one_buffer():
    x = {"emb": torch.randn(1000, 8), "ids": torch.arange(-5, 6), "half": torch.randn(7).half(),
         "bf": torch.randn(3, 3).bfloat16(), "flags": torch.tensor([True, False, True]), "none": torch.zeros(0, 4),
         "bytes": torch.arange(5, dtype=torch.uint8), "scalar": torch.tensor(2.5)}
    data = st_save(x, metadata={"kind": "full"})
    buf = _buf(data)
    got = tensors_of(buf)
    want = st_load(data)
    assert set(got) == set(want) == set(x)
    for k in x:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    got["emb"][0, 0] = 123.0  # a view: writable, and it writes the buffer it came from
    assert tensors_of(buf)["emb"][0, 0] == 123.0


def test_unaligned_data_is_copied_not_misread():
    a, b = torch.tensor([7], dtype=torch.uint8), torch.tensor([1.5, -2.0])
    data = _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}, a.numpy().tobytes() + b.numpy().tobytes())
    got = tensors_of(_buf(data))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


@pytest.mark.parametrize("header,data", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),  # bytes after the last tensor
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # a gap before it
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),  # shape != bytes
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # past the end
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),  # negative dim
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),  # reversed span
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),  # no offsets
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8),  # shape not a list
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),  # overlap
])
def test_malformed_files_are_refused(header, data):
    with pytest.raises(TensorFileError):
        tensors_of(_buf(_file(header, data)))


@pytest.mark.parametrize("data", [b"", b"\x05\0\0", struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 2) + b"[]",
                                  struct.pack("<Q", 3) + b"\xff\xfe{"])
def test_broken_headers_are_refused(data):
    with pytest.raises(TensorFileError):
        tensors_of(_buf(data))


def test_a_short_file_is_refused():
    with pytest.raises(TensorFileError, match="ended"):
        read_file(io.BytesIO(b"abc"), 10)
