"""The model store: published versions as safetensors + sha256 + metadata JSON (never pickle).

A *full* version holds every tensor. A *delta* holds, for each sparse embedding table, only the
rows touched since the base version (``<name>::rows`` int64 indices and ``<name>::values``) and
every dense tensor whole; applying it to its base gives bit-identical weights to a full snapshot.

Layout under the store root (a directory, or any fsspec URL such as ``s3://bucket/models``):
``v00000012.full.safetensors`` / ``v00000013.delta.safetensors`` and ``v00000013.json``.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import fsspec
import torch
from safetensors.torch import save as st_save

from trainer.tensorfile import TensorFileError, read_file, tensors_of

_NAME = re.compile(r"^v(\d{8})\.(full|delta)\.safetensors$")
ROWS, VALUES = "::rows", "::values"
MAX_FILE_BYTES = 8 << 30  # refuse absurd files before reading them


class ModelStoreError(ValueError):
    """A version that is missing, corrupt, or outside the store. ``reason`` is short."""


@dataclass
class VersionMeta:
    version: int
    kind: str  # full | delta
    base_version: int | None
    file: str
    sha256: str
    size_bytes: int
    created_at: int
    trained_until_ts: int
    samples_seen: int
    metrics: dict[str, float] = field(default_factory=dict)


def sha256_of(data) -> str:
    """Hex sha256 of bytes or any buffer (hashlib releases the GIL on large ones)."""
    return hashlib.sha256(data).hexdigest()


class ModelStore:
    """Publish, list, load and prune model versions under one root URL."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.fs.makedirs(self.path, exist_ok=True)

    # -- writing --------------------------------------------------------------------------
    def publish(self, version: int, kind: str, tensors: dict[str, torch.Tensor], *, base_version: int | None,
                trained_until_ts: int, samples_seen: int, metrics: dict[str, float] | None = None) -> VersionMeta:
        """Write one version (tensors already shaped as full or delta) and its metadata."""
        if kind not in ("full", "delta") or (kind == "delta") != (base_version is not None):
            raise ValueError("a delta needs a base version; a full snapshot has none")
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                       metadata={"version": str(version), "kind": kind})
        name = f"v{version:08d}.{kind}.safetensors"
        meta = VersionMeta(version, kind, base_version, name, sha256_of(data), len(data), int(time.time() * 1000),
                           trained_until_ts, samples_seen, dict(metrics or {}))
        self._atomic_write(name, data)
        self._atomic_write(f"v{version:08d}.json", json.dumps(asdict(meta), indent=1).encode())
        return meta

    def _atomic_write(self, name: str, data: bytes) -> None:
        final = posixpath.join(self.path, name)
        tmp = final + ".tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)

    def uri_of(self, meta: VersionMeta) -> str:
        return posixpath.join(self.root, meta.file)

    # -- reading --------------------------------------------------------------------------
    def versions(self) -> list[VersionMeta]:
        """Every version with metadata, oldest first."""
        out = []
        for p in self.fs.glob(posixpath.join(self.path, "v*.json")):
            try:
                out.append(VersionMeta(**json.loads(self.fs.cat_file(p))))
            except (ValueError, TypeError):
                continue  # a foreign or broken file is not a version
        return sorted(out, key=lambda m: m.version)

    def meta(self, version: int) -> VersionMeta:
        p = posixpath.join(self.path, f"v{version:08d}.json")
        if not self.fs.exists(p):
            raise ModelStoreError(f"missing: version {version} is not in the store")
        return VersionMeta(**json.loads(self.fs.cat_file(p)))

    def latest_version(self) -> int:
        vs = self.versions()
        return vs[-1].version if vs else 0

    def resolve(self, uri: str) -> str:
        """The store-relative file name of ``uri``; refuses anything outside the store."""
        name = uri[len(self.root) + 1:] if uri.startswith(self.root + "/") else uri
        if "/" in name or "\\" in name or not _NAME.fullmatch(name):  # fullmatch: "$" would accept a trailing newline
            raise ModelStoreError(f"uri: {uri!r} is not a version file of this store")
        return name

    def read_verified(self, name: str, sha256: str) -> dict[str, torch.Tensor]:
        """Tensors of a version file after checking its size and sha256 (safetensors only)."""
        p = posixpath.join(self.path, self.resolve(name))
        if not self.fs.exists(p):
            raise ModelStoreError(f"missing: {name}")
        if self.fs.size(p) > MAX_FILE_BYTES:
            raise ModelStoreError(f"size: {name} is larger than {MAX_FILE_BYTES} bytes")
        # Read into the buffer the tensors will live in: file reads, hashing and the tensor
        # views all run without holding the GIL for long (trainer/tensorfile.py says why).
        try:
            with self.fs.open(p, "rb") as fh:
                data = read_file(fh, self.fs.size(p))
            if sha256_of(data.numpy()) != sha256:
                raise ModelStoreError(f"sha256: {name} does not match its checksum")
            return tensors_of(data)
        except TensorFileError as e:
            raise ModelStoreError(f"format: {name} is not a valid safetensors file ({e})") from None

    def load(self, version: int) -> dict[str, torch.Tensor]:
        """Full weights of ``version``: its nearest full snapshot with the deltas after it applied."""
        chain = self.chain(version)
        state = self.read_verified(chain[0].file, chain[0].sha256)
        for meta in chain[1:]:
            state = apply_delta(state, self.read_verified(meta.file, meta.sha256))
        return state

    def chain(self, version: int) -> list[VersionMeta]:
        """[full, delta, delta, ...] ending at ``version``."""
        chain = [self.meta(version)]
        while chain[-1].kind == "delta":
            chain.append(self.meta(chain[-1].base_version))
        return chain[::-1]

    # -- housekeeping ---------------------------------------------------------------------
    def prune(self, keep: int) -> list[int]:
        """Delete versions no longer needed to load the newest ``keep`` ones; returns them."""
        vs = self.versions()
        needed: set[int] = set()
        for m in vs[-keep:]:
            needed.update(c.version for c in self.chain(m.version))
        removed = []
        for m in vs:
            if m.version not in needed:
                for name in (m.file, f"v{m.version:08d}.json"):
                    p = posixpath.join(self.path, name)
                    if self.fs.exists(p):
                        self.fs.rm(p)
                removed.append(m.version)
        return removed


def split_delta(state: dict[str, torch.Tensor], touched: dict[str, torch.Tensor],
                sparse_tables: Iterable[str]) -> dict[str, torch.Tensor]:
    """Delta tensors: touched rows of each sparse table, every other tensor whole."""
    sparse = set(sparse_tables)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in sparse:
            rows = touched.get(name, torch.empty(0, dtype=torch.int64)).to(torch.int64).unique().sort().values
            out[name + ROWS] = rows
            out[name + VALUES] = t.detach().cpu()[rows]
        else:
            out[name] = t
    return out


def check_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ModelStoreError` unless every part of ``delta`` fits ``base``: row indices
    inside their table with one value row each, dense tensors of the base's shapes."""
    for key, t in delta.items():
        if key.endswith(VALUES):
            if key[: -len(VALUES)] + ROWS not in delta:
                raise ModelStoreError(f"shape: {key} has no rows")
        elif key.endswith(ROWS):
            name = key[: -len(ROWS)]
            values = delta.get(name + VALUES)
            if values is None or name not in base or base[name].shape[1:] != values.shape[1:] \
                    or t.dim() != 1 or len(values) != len(t):
                raise ModelStoreError(f"shape: delta rows of {name} do not fit its base")
            if t.dtype not in (torch.int64, torch.int32) or values.dtype != base[name].dtype:
                raise ModelStoreError(f"dtype: delta rows of {name} are {t.dtype}, values {values.dtype}")
            if len(t) and (int(t.min()) < 0 or int(t.max()) >= base[name].shape[0]):
                raise ModelStoreError(f"shape: delta rows of {name} outside the table")
        elif key in base and base[key].shape != t.shape:
            raise ModelStoreError(f"shape: {key} {tuple(t.shape)} != base {tuple(base[key].shape)}")


def write_delta(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
    """Write a (checked) delta INTO ``state``'s own tensors: touched rows and dense weights."""
    for key, t in delta.items():
        if key.endswith(ROWS):
            name = key[: -len(ROWS)]
            state[name][t.long()] = delta[name + VALUES]
        elif not key.endswith(VALUES):
            state[key].copy_(t)


def apply_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state: ``base`` with the delta's rows and dense tensors written over it (tables
    copied first; dense tensors are the delta's own; ``base`` is never written)."""
    check_delta(base, delta)
    out = dict(base)
    for key, t in delta.items():
        if key.endswith(ROWS):
            name = key[: -len(ROWS)]
            table = base[name].clone()
            table[t.long()] = delta[name + VALUES]
            out[name] = table
        elif not key.endswith(VALUES):
            out[key] = t
    return out
