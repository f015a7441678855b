"""Trainer checkpoints: model, optimizer, consumed offsets, metric state and the learned-ids log
position, written together and atomically (a new directory renamed into place, then a pointer
file replaced). Tensors travel as safetensors; everything else as JSON. Never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "LATEST"


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer state_dict (possibly nested per optimizer) as tensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for which, sd in state.items():
        if sd is None:
            meta[which] = None
            continue
        scalars: dict[str, dict[str, float]] = {}
        for idx, per_param in sd["state"].items():
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{which}.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta[which] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    out: dict[str, Any] = {}
    for which, m in meta.items():
        if m is None:
            out[which] = None
            continue
        state: dict[int, dict[str, Any]] = {}
        prefix = which + "."
        for name, t in tensors.items():
            if name.startswith(prefix):
                idx, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[key] = t
        for idx, scalars in m["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        out[which] = {"state": state, "param_groups": m["param_groups"]}
    return out


def save_checkpoint(root: Path, model: torch.nn.Module, optimizer_state: dict, meta: dict[str, Any],
                    arrays: dict[str, np.ndarray], keep: int = 2) -> Path:
    """Write one checkpoint under ``root``; returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{time.time_ns()}"
    tmp = root / (name + ".tmp")
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, tmp / "arrays.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta | {"optimizer": opt_meta}))
    for f in tmp.iterdir():
        _fsync(f)
    final = root / name
    os.rename(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(name)
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    # Keep the newest ``keep`` checkpoints; also sweep directories a crash left half-written.
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-"))
    done = [p for p in ckpts if not p.name.endswith(".tmp")]
    for old in done[:-keep] + [p for p in ckpts if p.name.endswith(".tmp")]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any], dict[str, np.ndarray]] | None:
    """(model state, optimizer state, meta, arrays) of the latest checkpoint, or None."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    d = root / pointer.read_text().strip()
    meta = json.loads((d / "meta.json").read_text())
    opt = unflatten_optimizer(load_file(d / "optimizer.safetensors"), meta.pop("optimizer"))
    arrays = {k: v.numpy() for k, v in load_file(d / "arrays.safetensors").items()}
    return load_file(d / "model.safetensors"), opt, meta, arrays


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
