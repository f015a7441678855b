"""Model store: a delta applied to its base gives bit-identical weights to the full snapshot of
the same version; pruning keeps what the newest versions need; bad files are refused."""

from __future__ import annotations

import random

import pytest
import torch

from dmrstream.contracts import Sample
from dmrstream.settings import load_settings
from trainer.modelstore import ModelStore, ModelStoreError
from trainer.ready_batch import ReadyBatch, decode_ready, encode_ready
from trainer.service import Trainer

SMALL = {"model.item_vocab_size": 4096, "model.user_vocab_size": 4096, "model.category_vocab_size": 256,
         "model.aux_negatives": 32, "model.batch_size": 64}
SHAPE = load_settings(overrides=SMALL)  # what batch assembly reads


def batch(rng: random.Random, k0: int, n: int = 64) -> ReadyBatch:
    out = []
    for k in range(k0, k0 + n):
        h = rng.randrange(0, 6)
        out.append(Sample(sample_id=f"s{k}", event_id=f"s{k}", user_id=k % 31, item_id=rng.randrange(900),
                          category_id=rng.randrange(40), ts=1_700_000_000_000 + k, label=rng.randrange(2),
                          hist_item_ids=[rng.randrange(900) for _ in range(h)], hist_category_ids=[1] * h,
                          hist_behaviors=["click"] * h, hist_ts=[1_600_000_000_000 + i for i in range(h)]))
    return ReadyBatch.of_samples(out, {0: k0 + n}, SHAPE)


@pytest.fixture
def trainer(tmp_path):
    s = load_settings(overrides={"state_dir": str(tmp_path / "state"), "model_store": str(tmp_path / "models"), **SMALL})
    t = Trainer(s, "dmr", "cpu")
    yield t
    t.close()


def test_delta_chain_is_bit_identical_to_a_full_snapshot(trainer, tmp_path):
    rng = random.Random(0)
    trainer.learn(batch(rng, 0))
    v1 = trainer.publish("full")
    versions = [v1]
    for i in range(1, 4):  # three deltas, each after more learning
        trainer.learn(batch(rng, 64 * i))
        versions.append(trainer.publish("delta"))
    assert [u.kind for u in versions] == ["full", "delta", "delta", "delta"]
    assert [u.base_version for u in versions[1:]] == [1, 2, 3]
    live = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    store = ModelStore(trainer.settings.model_store)
    via_chain = store.load(versions[-1].version)
    snapshot = ModelStore(str(tmp_path / "other")).publish(1, "full", live, base_version=None, trained_until_ts=0,
                                                          samples_seen=0)
    full = ModelStore(str(tmp_path / "other")).read_verified(snapshot.file, snapshot.sha256)
    assert via_chain.keys() == full.keys()
    for name in full:
        assert torch.equal(via_chain[name], full[name]), name
    # deltas hold only touched rows: far smaller than a full version
    sizes = {m.version: m.size_bytes for m in store.versions()}
    assert max(sizes[v.version] for v in versions[1:]) < sizes[1] / 3


def test_prune_keeps_every_version_the_newest_need(trainer):
    rng = random.Random(1)
    for i in range(6):
        trainer.learn(batch(rng, 64 * i))
        trainer.publish("full" if i in (0, 3) else "delta")
    store = ModelStore(trainer.settings.model_store)
    removed = store.prune(keep=2)  # v5, v6 are deltas on v4 (full)
    assert removed == [1, 2, 3]
    assert [m.version for m in store.versions()] == [4, 5, 6]
    store.load(6)


def test_bad_files_and_uris_are_refused(trainer, tmp_path):
    rng = random.Random(2)
    trainer.learn(batch(rng, 0))
    meta = trainer.store.meta(trainer.publish("full").version)
    store = trainer.store
    with pytest.raises(ModelStoreError, match="uri"):
        store.resolve("../../etc/passwd")
    with pytest.raises(ModelStoreError, match="sha256"):
        store.read_verified(meta.file, "0" * 64)
    path = tmp_path / "models" / meta.file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelStoreError):
        store.read_verified(meta.file, meta.sha256)
    import hashlib
    import pickle

    payload = pickle.dumps({"weights": [1, 2, 3]})
    path.write_bytes(payload)
    with pytest.raises(ModelStoreError, match="format"):
        store.read_verified(meta.file, hashlib.sha256(payload).hexdigest())


def test_a_batch_from_the_prefetch_process_learns_exactly_like_one_built_here(tmp_path):
    """Batches cross from the prefetch process as bytes (trainer/ready_batch.py): same learning,
    repeats dropped, bit for bit."""
    states = []
    for travelled in (False, True):
        s = load_settings(overrides={**SMALL, "state_dir": str(tmp_path / f"s{travelled}"),
                                     "model_store": str(tmp_path / f"m{travelled}")})
        torch.manual_seed(0)
        t = Trainer(s, "dmr", "cpu")
        rng = random.Random(4)
        for k0 in (0, 64, 100):  # the last batch repeats 28 samples already learned
            rb = batch(rng, k0)
            if travelled:
                rb = decode_ready(encode_ready(rb))
            torch.manual_seed(k0)  # the auxiliary loss samples negatives
            t.learn(rb)
        assert t.samples_seen == 164
        states.append({k: v.clone() for k, v in t.model.state_dict().items()})
        t.close()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
