"""Load and validate a published model version off the serving path (SPEC section 8).

Every check happens before a version can serve: the URI must name a version file of the store,
the bytes must match the announced sha256 and parse as safetensors (never pickle), the tensor
names, shapes and dtypes must be exactly those of the model the settings describe, every value
must be finite, and a forward pass on a fixed probe batch must give finite probabilities. A delta
whose base is the live version is written into the spare replica (the previous version,
brought level with the live one: ``streamer/scoring_spare.py``) or, without one, applied to a copy
of the live state; any other delta is loaded through the store's chain. The live version's tensors
are never written.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dmrstream.contracts import ModelUpdate
from monitoring import metrics
from trainer.features import Batch, columns_to_batch
from trainer.model import build_model
from trainer.modelstore import ROWS, VALUES, ModelStore, ModelStoreError, apply_delta, check_delta, write_delta

log = logging.getLogger(__name__)


class Refused(Exception):
    """A version that must not serve. ``reason`` is a short metric label, ``detail`` the why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Loaded:
    """A validated version ready to serve: its model (eval mode) and the state it was built from
    (kept so the next delta can be applied to a copy without reading the chain again)."""

    version: int
    model: nn.Module
    state: dict[str, torch.Tensor]
    update: ModelUpdate | None = None
    loaded_at: float = field(default_factory=time.monotonic)
    delta: dict[str, torch.Tensor] | None = None  # the delta that made it from its base, if any
    readers: int = 0  # forward passes using it now (ModelHolder.reading)

    @property
    def trained_until_ts(self) -> int:
        return self.update.trained_until_ts if self.update else 0


class Validator:
    """Reference names/shapes/dtypes and the probe batch of the model the settings describe."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.kind = settings.scorer.model_kind
        with torch.device("meta"):  # shapes only: no memory, no random init
            self._template = build_model(settings, self.kind)
        self.reference = {k: (tuple(v.shape), v.dtype) for k, v in self._template.state_dict().items()}
        self.probe = probe_batch(settings).to_torch()

    def materialise(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A model whose parameters ARE the given tensors (``assign``: no copy, no init)."""
        model = copy.deepcopy(self._template)  # a meta-device copy: cheaper than building again
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def check(self, state: dict[str, torch.Tensor], changed: dict[str, torch.Tensor] | None = None) -> None:
        """Names, shapes, dtypes of ``state``; finite values of every tensor in ``changed`` (a
        delta's own tensors: rows and dense weights) or, when None, of the whole state."""
        names, ref = set(state), set(self.reference)
        if names != ref:
            missing, extra = sorted(ref - names)[:3], sorted(names - ref)[:3]
            raise Refused("names", f"missing {missing}, unexpected {extra}")
        for name, t in state.items():
            shape, dtype = self.reference[name]
            if tuple(t.shape) != shape:
                raise Refused("shape", f"{name} is {tuple(t.shape)}, the model needs {shape}")
            if t.dtype != dtype:
                raise Refused("dtype", f"{name} is {t.dtype}, the model needs {dtype}")
        for name, t in (state if changed is None else changed).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise Refused("nonfinite", f"{name} holds NaN or infinite values")

    def probe_pass(self, model: nn.Module) -> None:
        """Forward the fixed probe batch: probabilities must be finite and in [0, 1]."""
        try:
            with torch.inference_mode():
                p = torch.sigmoid(model(self.probe)[0].float())
        except Exception as e:  # a model that cannot even run is refused, not served
            raise Refused("probe", f"forward pass failed ({type(e).__name__}: {e})") from None
        if p.shape != (len(self.probe),) or not bool(torch.isfinite(p).all()) or float(p.min()) < 0 or float(p.max()) > 1:
            raise Refused("probe", "probe batch gave non-finite or out-of-range scores")


def probe_batch(settings: Any, n: int = 8) -> Batch:
    """A fixed, seeded batch touching every input (histories, fields, counters)."""
    rng = np.random.default_rng(12345)
    T = settings.features.seq_len
    lens = [int(x) for x in rng.integers(0, T + 1, n)]
    return columns_to_batch({
        "user_id": [int(u) for u in rng.integers(0, 1 << 40, n)],
        "item_id": [int(i) for i in rng.integers(0, 1 << 40, n)],
        "category_id": [int(c) for c in rng.integers(0, 1000, n)],
        "ts": [1_700_000_000_000] * n,
        "hist_item_ids": [[int(x) for x in rng.integers(0, 1 << 40, k)] for k in lens],
        "hist_category_ids": [[int(x) for x in rng.integers(0, 1000, k)] for k in lens],
        "hist_behaviors": [["click"] * k for k in lens],
        "hist_ts": [[1_699_999_000_000 + j for j in range(k)] for k in lens],
        "counters": [{"user_impressions": 10.0, "user_clicks": 2.0, "item_impressions": 50.0, "item_clicks": 5.0}] * n,
        "user_profile": [{"age": 30, "gender": "f"}] * n,
        "context": [{"page": "home"}] * n,
        "item_features": [{"brand": "b1", "price": 9.5}] * n,
    }, settings)


def load_candidate(update: ModelUpdate, store: ModelStore, validator: Validator,
                   live: Loaded | None = None, spare: Loaded | None = None) -> Loaded:
    """Load ``update`` and validate it; raises :class:`Refused` (never serves a bad version).

    Runs on a background thread: it reads files and builds (or writes ``spare``, a replica level
    with ``live`` that no pass reads) while the live one keeps answering; nothing here touches
    the live model's tensors. A refused delta may have been written into ``spare``: drop it."""
    started = time.perf_counter()
    model, delta = None, None
    try:
        name = store.resolve(update.uri)  # refuses anything outside the store
        if not name.startswith(f"v{update.version:08d}.{update.kind}."):
            raise Refused("uri", f"{update.uri!r} is not the file of v{update.version} ({update.kind})")
        if update.kind == "delta" and live is not None and live.version == update.base_version:
            delta = store.read_verified(name, update.sha256)
            check_delta(live.state, delta)
            if spare is not None:  # every check before the first write into the spare
                dense = {k: t for k, t in delta.items() if not k.endswith((ROWS, VALUES))}
                validator.check(live.state | dense, delta)
                write_delta(spare.state, delta)
                model, state, changed = spare.model, spare.state, None
            else:
                state = apply_delta(live.state, delta)  # new tables for what changed
                changed = delta  # the rest of every table is the live version's, already validated
        elif update.kind == "full":
            state, changed = store.read_verified(name, update.sha256), None
        else:  # a delta on another base: its whole chain, each file checked against its metadata
            meta = store.meta(update.version)
            if meta.sha256 != update.sha256:
                raise Refused("sha256", f"v{update.version} in the store does not match the announced checksum")
            state, changed = store.load(update.version), None
    except ModelStoreError as e:
        raise Refused(metrics.reason_kind(str(e)), str(e)) from None
    if model is None:
        validator.check(state, changed)
        model = validator.materialise(state)
    validator.probe_pass(model)
    metrics.SCORER_LOAD_SECONDS.labels(update.kind).observe(time.perf_counter() - started)
    return Loaded(update.version, model, state, update, delta=delta)
