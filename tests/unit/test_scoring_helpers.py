"""Helpers of the scorer tests (no tests here): small settings, a real trainer publishing versions."""

from __future__ import annotations

import random

from dmrstream.contracts import Candidate, Sample, ScoreRequest
from dmrstream.settings import load_settings
from trainer.ready_batch import ReadyBatch
from trainer.service import Trainer

T0 = 1_700_000_000_000
SMALL = {"model.item_vocab_size": 4096, "model.user_vocab_size": 4096, "model.category_vocab_size": 256,
         "model.field_vocab_size": 4096, "model.aux_negatives": 32, "model.batch_size": 32,
         "model.mlp_hidden": [64, 32], "trainer.keep_versions": 100_000, "metrics.trainer_port": 0,
         "scorer.max_wait_ms": 1.0}


def small_settings(tmp_path, **extra):
    return load_settings(overrides={**SMALL, "state_dir": str(tmp_path / "state"),
                                    "model_store": str(tmp_path / "models"), **extra})


def samples(rng: random.Random, start: int, n: int = 32) -> list[Sample]:
    out = []
    for k in range(start, start + n):
        m = rng.randrange(0, 8)
        out.append(Sample(sample_id=f"s{k}", event_id=f"s{k}", user_id=k % 97, item_id=rng.randrange(500),
                          category_id=rng.randrange(20), ts=T0 + k * 1000, label=int(rng.random() < 0.4),
                          hist_item_ids=[rng.randrange(500) for _ in range(m)], hist_category_ids=[1] * m,
                          hist_behaviors=["click"] * m, hist_ts=[T0 - 10_000 + i for i in range(m)],
                          counters={"user_impressions": float(k % 7), "user_clicks": float(k % 3),
                                    "item_impressions": 3.0, "item_clicks": 1.0}))
    return out


class Publisher:
    """The real trainer: learns a small batch, then publishes a full or delta version."""

    def __init__(self, settings, seed: int = 1):
        self.trainer = Trainer(settings, device="cpu")
        self.rng = random.Random(seed)
        self.k = 0

    @property
    def store(self):
        return self.trainer.store

    def next(self, kind: str):
        self.trainer.learn(ReadyBatch.of_samples(samples(self.rng, self.k), {}, self.trainer.settings))
        self.k += 32
        return self.trainer.publish(kind)

    def close(self):
        self.trainer.close()


def request(i: int, n: int = 5, user=None) -> ScoreRequest:
    return ScoreRequest(request_id=f"r{i}", user_id=i % 50 if user is None else user,
                        candidates=[Candidate(item_id=(i * 7 + j) % 500, category_id=j % 20) for j in range(n)],
                        ts=T0 + 10_000_000 + i)


class FastPublisher:
    """Versions without training (for many swaps): random rows of every sparse table and all
    dense tensors move a little, published through the store exactly as the trainer does
    (``publish`` full, or ``split_delta`` of the touched rows)."""

    def __init__(self, settings, seed: int = 1):
        import torch

        from trainer.model import build_model
        from trainer.modelstore import ModelStore

        self.torch = torch
        model = build_model(settings, settings.scorer.model_kind)
        self.sparse = [n + ".weight" for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Embedding) and m.sparse]
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.store = ModelStore(settings.model_store)
        self.gen = torch.Generator().manual_seed(seed)
        self.version = 0

    def next(self, kind: str):
        from dmrstream.contracts import ModelUpdate
        from trainer.modelstore import split_delta

        torch = self.torch
        touched = {}
        for name, t in self.state.items():
            if name in self.sparse:
                rows = torch.randint(1, t.shape[0], (64,), generator=self.gen)
                t[rows] += 0.01 * torch.randn(len(rows), t.shape[1], generator=self.gen)
                touched[name] = rows
            elif t.is_floating_point():
                t += 0.001 * torch.randn(t.shape, generator=self.gen)
        if self.version == 0:
            kind = "full"
        base = self.version if kind == "delta" else None
        tensors = self.state if kind == "full" else split_delta(self.state, touched, self.sparse)
        meta = self.store.publish(self.version + 1, kind, tensors, base_version=base, trained_until_ts=T0,
                                  samples_seen=self.version)
        self.version += 1
        return ModelUpdate(version=meta.version, kind=kind, base_version=base, uri=self.store.uri_of(meta),
                           sha256=meta.sha256, created_at=meta.created_at, trained_until_ts=T0,
                           samples_seen=meta.samples_seen)
