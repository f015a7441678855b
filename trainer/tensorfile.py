"""safetensors file -> tensors that are views of the one buffer it was read into (no copy, no
long GIL hold).

``safetensors.torch.load`` copies every tensor inside one Rust call that holds the GIL: 109-238 ms
for the default model's 420 MB on this machine, during which a scorer's serving thread cannot
run a single Python line (that was the p99 of a full hot swap). The format is simple and fully
specified (8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, the
data): parsing it here lets the file be read straight into the memory the tensors use. Every
check the library makes is made here too: known dtypes, sizes that match shapes, offsets that
tile the data exactly (no overlap, no gap, nothing past the end). Writing stays with the library.
"""

from __future__ import annotations

import json
import math

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 << 20


class TensorFileError(ValueError):
    """The bytes are not a well-formed safetensors file."""


def read_file(fh, size: int) -> torch.Tensor:
    """``size`` bytes of an open binary file into a new uint8 tensor (reads release the GIL;
    no zero-filling first). Raises :class:`TensorFileError` when the file is shorter."""
    buf = torch.empty(size, dtype=torch.uint8)
    view, got = memoryview(buf.numpy()), 0
    while got < size:
        n = fh.readinto(view[got:])
        if not n:
            raise TensorFileError(f"file ended after {got} of {size} bytes")
        got += n
    return buf


def tensors_of(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file held in ``buf`` (uint8): views of it where aligned
    (they keep it alive; writing them writes ``buf``), copies where not. Raises
    :class:`TensorFileError` on anything malformed."""
    if len(buf) < 8:
        raise TensorFileError("shorter than the header length")
    n = int.from_bytes(buf[:8].numpy().tobytes(), "little")
    if n > min(len(buf) - 8, MAX_HEADER_BYTES):
        raise TensorFileError("header longer than the file")
    try:
        header = json.loads(buf[8:8 + n].numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TensorFileError("header is not JSON") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not an object")
    start, size = 8 + n, len(buf) - 8 - n
    spans, out = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape, (begin, end) = info["shape"], info["data_offsets"]
            if not all(type(v) is int for v in (*shape, begin, end)) or not isinstance(shape, list):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"bad header entry for {name!r}") from None
        count = math.prod(shape)
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise TensorFileError(f"{name!r}: shape {shape} does not match its {end - begin} bytes")
        spans.append((begin, end))
        raw = buf[start + begin:start + end]
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # a view must be aligned to its element size (library-written files are)
        out[name] = raw.view(dtype).view(shape) if count else torch.empty(shape, dtype=dtype)
    edge = 0
    for begin, end in sorted(spans):
        if begin != edge:
            raise TensorFileError("tensor data overlaps or leaves a gap")
        edge = end
    if edge != size:
        raise TensorFileError("data does not end where the last tensor does")
    return out
