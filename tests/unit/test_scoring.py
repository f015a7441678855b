"""Scorers: input equivalence, validation and refusals (the old version keeps serving), deltas
identical to full snapshots, serving AUC and automatic rollback, read-only feature-store views."""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import save as st_save

from dmrstream.contracts import Candidate, Click, Impression, ModelUpdate, Sample, ScoreRequest
from featurestore import open_partition_store
from streamer.scoring import ModelHolder, NoFeatures, Scorer, UserFeatures, requests_batch
from streamer.scoring_auc import ServingAUC
from streamer.scoring_features import StoreFeatures, partition_of
from streamer.scoring_swap import Swapper
from test_scoring_helpers import T0, Publisher, request, small_settings
from trainer.features import samples_to_batch
from trainer.modelstore import sha256_of


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("dmrstream_scorer_refusals_total", {"reason": reason}) or 0.0


@pytest.fixture
def served(tmp_path):
    """A real store with v1 (full) live in a scorer."""
    s = small_settings(tmp_path)
    pub = Publisher(s)
    v1 = pub.next("full")
    holder = ModelHolder()
    swapper = Swapper(holder, pub.store, s)
    assert swapper.apply(v1)
    yield s, pub, holder, swapper, Scorer(holder, NoFeatures(), s), v1
    pub.close()


def test_request_batch_equals_one_sample_per_candidate(tmp_path):
    s = small_settings(tmp_path)
    f = UserFeatures([3, "x9", 7], [1, 2, "c"], ["click", "buy", "cart"], [T0 - 30_000, T0 - 20_000, T0 - 10],
                     {"age": 3, "g": "f"}, [{"user_impressions": 4.0, "user_clicks": 1.0, "item_impressions": float(j),
                                              "item_clicks": 0.0} for j in range(4)])
    req = ScoreRequest(request_id="r", user_id="u1", ts=T0, context={"page": "home"},
                       candidates=[Candidate(item_id=j, category_id=j % 3, item_features={"brand": f"b{j}"})
                                   for j in range(4)])
    cold = ScoreRequest(request_id="r2", user_id=8, ts=T0 + 5, candidates=[Candidate(item_id=1, category_id=1)])
    got = requests_batch([req, cold], [f, UserFeatures.empty()], s)
    assert len(got) == 5
    want = samples_to_batch([*(Sample(
        sample_id=f"s{j}", event_id=f"s{j}", user_id="u1", item_id=c.item_id, category_id=c.category_id, ts=T0,
        label=0, hist_item_ids=f.hist_item_ids, hist_category_ids=f.hist_category_ids,
        hist_behaviors=f.hist_behaviors, hist_ts=f.hist_ts, context=req.context, user_profile=f.user_profile,
        item_features=c.item_features, counters=f.counters[j]) for j, c in enumerate(req.candidates)),
        Sample(sample_id="c", event_id="c", user_id=8, item_id=1, category_id=1, ts=T0 + 5, label=0)], s)
    for field in dataclasses.fields(want):
        if field.name != "group":
            np.testing.assert_array_equal(getattr(got, field.name), getattr(want, field.name), err_msg=field.name)
    assert got.group.tolist() == [0, 0, 0, 0, 1]  # one user side per request


def _still_serving(scorer, version):
    out = scorer.score([request(1), request(2, n=200)])
    assert [o.model_version for o in out] == [version, version]
    assert all(0.0 <= x.score <= 1.0 for o in out for x in o.scores)


def _bad_update(pub, version: int, data: bytes, *, kind="full", sha=None, uri=None) -> ModelUpdate:
    name = f"v{version:08d}.{kind}.safetensors"
    path = pub.store.path + "/" + name
    with open(path, "wb") as fh:
        fh.write(data)
    return ModelUpdate(version=version, kind=kind, base_version=None if kind == "full" else version - 1,
                       uri=uri or f"{pub.store.root}/{name}", sha256=sha or sha256_of(data),
                       created_at=T0, trained_until_ts=T0, samples_seen=1)


def _state(pub):
    return {k: v.detach().clone() for k, v in pub.trainer.model.state_dict().items()}


@pytest.mark.parametrize("case", ["truncated", "sha256", "nan", "shape", "names", "pickle", "outside", "traversal"])
def test_bad_versions_are_refused_and_the_old_one_keeps_serving(served, tmp_path, case):
    s, pub, holder, swapper, scorer, v1 = served
    state = _state(pub)
    good = st_save(state)
    if case == "truncated":  # the announced checksum matches the truncated bytes: parse must catch it
        up, reason = _bad_update(pub, 2, good[: len(good) // 2]), "format"
    elif case == "sha256":
        up, reason = _bad_update(pub, 2, good, sha="0" * 64), "sha256"
    elif case == "nan":
        name = next(k for k in state if k.startswith("mlp."))
        state[name][0] = float("nan")
        up, reason = _bad_update(pub, 2, st_save(state)), "nonfinite"
    elif case == "shape":
        state["inputs.item_emb.weight"] = torch.zeros(100, state["inputs.item_emb.weight"].shape[1])
        up, reason = _bad_update(pub, 2, st_save(state)), "shape"
    elif case == "names":
        state["evil.weight"] = torch.zeros(3)
        up, reason = _bad_update(pub, 2, st_save(state)), "names"
    elif case == "pickle":  # a torch.save (pickle) payload under a version file name, correct checksum
        buf = io.BytesIO()
        torch.save(state, buf)
        up, reason = _bad_update(pub, 2, buf.getvalue()), "format"
    elif case == "outside":
        outside = tmp_path / "elsewhere.safetensors"
        outside.write_bytes(good)
        up = ModelUpdate(version=2, kind="full", uri=str(outside), sha256=sha256_of(good), created_at=T0,
                         trained_until_ts=T0, samples_seen=1)
        reason = "uri"
    else:
        up = ModelUpdate(version=2, kind="full", uri=f"{pub.store.root}/../v00000002.full.safetensors",
                         sha256=sha256_of(good), created_at=T0, trained_until_ts=T0, samples_seen=1)
        reason = "uri"
    before = refusals(reason)
    assert not swapper.apply(up)
    assert refusals(reason) == before + 1
    assert swapper.refused[2] == reason
    assert holder.get().version == 1
    _still_serving(scorer, 1)


def test_bad_delta_is_refused(served):
    s, pub, holder, swapper, scorer, v1 = served
    v2 = pub.next("delta")
    delta = dict(pub.store.read_verified(pub.store.resolve(v2.uri), v2.sha256))
    name = next(k for k in delta if k.endswith("::rows"))
    delta[name] = torch.tensor([10**9])  # a row outside the table
    delta[name[:-6] + "::values"] = torch.zeros(1, delta[name[:-6] + "::values"].shape[1])
    bad = _bad_update(pub, 3, st_save(delta), kind="delta")
    bad = ModelUpdate(**{**{f: getattr(bad, f) for f in bad.__struct_fields__}, "base_version": 1})
    assert not swapper.apply(bad)
    assert holder.get().version == 1
    _still_serving(scorer, 1)


def test_deltas_give_outputs_identical_to_the_full_snapshot(served):
    s, pub, holder, swapper, scorer, v1 = served
    for _ in range(4):
        assert swapper.apply(pub.next("delta"))  # each applied to a copy of the live state
    via_deltas = scorer.score([request(i, n=20) for i in range(30)])
    full = pub.trainer.publish("full")  # the same weights, as one full file
    fresh_holder = ModelHolder()
    assert Swapper(fresh_holder, pub.store, s).apply(full)
    via_full = Scorer(fresh_holder, NoFeatures(), s).score([request(i, n=20) for i in range(30)])
    assert [o.model_version for o in via_deltas] == [5] * 30 and via_full[0].model_version == 6
    assert [[x.score for x in o.scores] for o in via_deltas] == [[x.score for x in o.scores] for o in via_full]
    # and the store's own chain loader agrees bit for bit
    chain = pub.store.load(5)
    assert all(torch.equal(chain[k], t) for k, t in holder.get().state.items())


def test_a_fresh_scorer_serves_the_newest_version_that_loads(served, tmp_path):
    s, pub, holder, swapper, scorer, v1 = served
    ups = [v1, pub.next("delta"), pub.next("delta")]
    bad = ModelUpdate(version=4, kind="full", uri=f"{pub.store.root}/v00000004.full.safetensors", sha256="1" * 64,
                      created_at=T0, trained_until_ts=T0, samples_seen=1)
    fresh = ModelHolder()
    assert Swapper(fresh, pub.store, s).bootstrap([*ups, bad]).version == 3  # v4 is missing: newest good


def test_serving_auc_and_automatic_rollback(served):
    s, pub, holder, swapper, scorer, v1 = served
    s.scorer.rollback_min_samples, s.scorer.rollback_margin = 200, 0.05
    assert swapper.apply(pub.next("full"))
    auc = ServingAUC(window=1000)
    rng = random.Random(0)
    for i in range(400):  # v1 ranked well, v2 at random
        label = int(rng.random() < 0.3)
        auc.served(f"a{i}", 0.2 + 0.6 * label + rng.uniform(-0.3, 0.3), 1)
        auc.served(f"b{i}", rng.random(), 2)
        auc.labelled(f"a{i}", label)
        auc.labelled(f"b{i}", label)
        if i == 100:
            assert not swapper.check_rollback(auc)  # too few labelled samples yet
    assert auc.labelled("never-served", 1) is None
    m = auc.publish_metrics()
    assert m[1][0] > 0.9 and m[2][0] < 0.7 and m[1][1] == 400
    assert REGISTRY.get_sample_value("dmrstream_serving_auc", {"version": "1"}) == pytest.approx(m[1][0])
    assert swapper.check_rollback(auc)
    assert holder.get().version == 1 and swapper.refused[2] == "rolled_back"
    _still_serving(scorer, 1)
    assert not swapper.check_rollback(auc)  # nothing more to roll back to
    assert swapper.apply(pub.next("delta"))  # a newer version (base v2, via the chain) is accepted
    assert holder.get().version == 3


def test_store_features_read_only_beside_the_owner_and_refresh(tmp_path):
    s = small_settings(tmp_path)
    user = 42
    p = partition_of(user, s.topics.partitions)
    owner = open_partition_store(s, p)  # the streamer worker's writable handle stays open
    try:
        owner.apply([Click(event_id="c1", user_id=user, item_id=7, category_id=2, ts=T0 - 5000),
                     Impression(event_id="i1", user_id=user, item_id=9, category_id=2, ts=T0 - 4000)])
        feats = StoreFeatures(s, refresh=False)
        req = ScoreRequest(request_id="r", user_id=user, ts=T0, candidates=[Candidate(item_id=9, category_id=2)])
        f = feats.lookup([req], [None])[0]
        assert f.hist_item_ids == [7] and f.hist_behaviors == ["click"]
        assert f.counters[0]["user_impressions"] == 1.0 and f.counters[0]["item_impressions"] == 1.0
        owner.apply([Click(event_id="c2", user_id=user, item_id=8, category_id=2, ts=T0 - 3000)])
        assert feats.lookup([req], [p])[0].hist_item_ids == [7]  # a read-only view is a fixed snapshot...
        feats.refresh()
        assert feats.lookup([req], [p])[0].hist_item_ids == [7, 8]  # ...until it is reopened
        before = ScoreRequest(request_id="r0", user_id=user, ts=T0 - 4000, candidates=req.candidates)
        assert feats.lookup([before], [p])[0].hist_item_ids == [7]  # strictly before the request
        feats.close()
    finally:
        owner.close()


def test_deltas_are_written_into_the_spare_replica_bit_for_bit(served):
    """After the first delta, each delta is written in place into the replaced version's tensors
    (two replicas take turns, no table is copied); any mix of full and delta versions serves the
    store's own weights bit for bit."""
    s, pub, holder, swapper, scorer, v1 = served
    table = next(k for k in holder.get().state if k.endswith("item_emb.weight"))
    buffers = {holder.get().state[table].data_ptr()}
    for kind in ["delta", "delta", "delta", "full", "delta", "delta", "delta"]:
        up = pub.next(kind)
        assert swapper.apply(up)
        live = holder.get()
        chain = pub.store.load(up.version)
        assert all(torch.equal(chain[k], t) for k, t in live.state.items()), up.version
        buffers.add(live.state[table].data_ptr())
    # v1, the copy made for the first delta, the full v5: no other table was ever allocated
    assert len(buffers) == 3


def test_a_spare_still_read_is_not_written(served):
    """A pass that began before a swap may still read the replaced version: the next delta waits
    for it before writing into that replica."""
    import threading

    s, pub, holder, swapper, scorer, v1 = served
    with holder.reading() as reading:  # a pass on v1 that outlives the next swap
        assert reading.version == 1
        assert swapper.apply(pub.next("delta"))  # v2 in a copy; v1 becomes the spare
        before = {k: t.clone() for k, t in reading.state.items()}
        done = threading.Event()
        th = threading.Thread(target=lambda: (swapper.apply(pub.next("delta")), done.set()))
        th.start()
        assert not done.wait(0.5)  # v3 waits for this pass ...
        assert all(torch.equal(before[k], t) for k, t in reading.state.items())  # ... v1 intact
    th.join(10)
    assert done.is_set() and holder.get().version == 3
    assert holder.get().state[next(iter(before))].data_ptr() == reading.state[next(iter(before))].data_ptr()
    chain = pub.store.load(3)
    assert all(torch.equal(chain[k], t) for k, t in holder.get().state.items())
