"""The feature store on real RocksDB files: property tests against the plain reference function,
idempotency, point-in-time reads, multi-get arrays, offsets and caller state, retention,
snapshots and partition hand-over."""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dmrstream.contracts import Click, Impression, Score
from dmrstream.settings import FeatureSettings, load_settings
from featurestore import FeatureStore, PartitionStore
from featurestore_log import T0, event_log, reference_counters, reference_sequences, store_sequences

USERS = [1, 2, "u3"]


def small(seq_len=5, extra=0, **kw) -> FeatureSettings:
    return FeatureSettings(seq_len=seq_len, seq_keep_extra=extra, block_cache_mb=0, **kw)


@st.composite
def event_logs(draw, max_events=40, times=20):
    """Distinct events (ids unique), then a shuffled log with some of them repeated."""
    n = draw(st.integers(1, max_events))
    events = []
    for k in range(n):
        user = draw(st.sampled_from(USERS))
        item = draw(st.sampled_from([10, 11, "i12"]))
        ts = T0 + draw(st.integers(0, times)) * 1000
        if draw(st.booleans()):
            events.append(Click(event_id=f"e{k}", user_id=user, item_id=item, category_id=7, ts=ts,
                                behavior=draw(st.sampled_from(["click", "click", "buy", "cart"]))))
        else:
            events.append(Impression(event_id=f"e{k}", user_id=user, item_id=item, category_id=7, ts=ts))
    log = events + draw(st.lists(st.sampled_from(events), max_size=n))
    draw(st.randoms(use_true_random=False)).shuffle(log)
    return log


def apply_in_batches(store, log, rnd: random.Random):
    i = 0
    while i < len(log):
        j = i + rnd.randint(1, 8)
        store.apply(log[i:j])
        i = j


@given(event_logs(), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sequences_equal_the_reference_for_shuffled_duplicated_logs(log, rnd):
    with tempfile.TemporaryDirectory() as d, PartitionStore(d, small()) as store:
        apply_in_batches(store, log, rnd)
        assert store_sequences(store, USERS, 5) == {u: reference_sequences(log, 5).get(u, []) for u in USERS}
        # A second delivery of the whole log changes nothing.
        store.apply(log)
        assert store_sequences(store, USERS, 5) == {u: reference_sequences(log, 5).get(u, []) for u in USERS}


@given(event_logs(max_events=30, times=6), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_point_in_time_counters_equal_the_reference(log, rnd):
    # At most 7 distinct times and 30 events: within the counters' kept times and the memories.
    with tempfile.TemporaryDirectory() as d, PartitionStore(d, small(seq_len=50)) as store:
        apply_in_batches(store, log, rnd)
        for user in USERS:
            for item in (10, "i12"):
                for k in (None, *range(0, 8)):
                    as_of = None if k is None else T0 + k * 1000
                    assert store.counters_as_of(user, item, as_of) == reference_counters(log, user, item, as_of)


def test_point_in_time_reads_exclude_the_same_timestamp(tmp_path):
    with PartitionStore(tmp_path, small()) as store:
        store.apply([Impression(event_id="i", user_id=1, item_id=5, category_id=1, ts=T0),
                     Click(event_id="c", user_id=1, item_id=5, category_id=1, ts=T0),
                     Impression(event_id="i2", user_id=1, item_id=6, category_id=1, ts=T0)])
        assert store.get_sequence(1, as_of=T0) == []
        assert store.counters_as_of(1, 5, T0) == dict.fromkeys(
            ["user_impressions", "user_clicks", "item_impressions", "item_clicks"], 0.0)
        assert store.counters_as_of(1, 5, T0 + 1) == {"user_impressions": 2.0, "user_clicks": 1.0,
                                                      "item_impressions": 1.0, "item_clicks": 1.0}


def test_multi_get_arrays_match_get_sequence(tmp_path):
    log = event_log(3, 3000, users=40, items=30)
    with PartitionStore(tmp_path, small(seq_len=6, extra=4)) as store:
        store.apply(log)
        users = [e.user_id for e in log[:200:7]] + ["nobody", 10**9]
        rng = np.random.default_rng(0)
        as_of = rng.integers(log[-1].ts - 300_000, log[-1].ts + 2, size=len(users))
        for T in (3, 6, 12):
            b = store.multi_get(users, as_of=as_of, T=T)
            assert b.item_ids.shape == b.ts.shape == b.mask.shape == b.behaviors.shape == (len(users), T)
            assert b.user_ids == users
            assert b.item_ids.dtype == np.int64  # int item ids
            assert b.category_ids.dtype == object  # some category ids are strings in this log
            for r, u in enumerate(users):
                seq = store.get_sequence(u, as_of=int(as_of[r]), limit=T)
                k = len(seq)
                assert b.lengths[r] == k and b.mask[r].sum() == k
                assert not b.mask[r, : T - k].any()  # left padding, most recent last
                assert list(b.ts[r, T - k:]) == [s.ts for s in seq]
                assert list(b.item_ids[r, T - k:]) == [s.item_id for s in seq]
                assert list(b.category_ids[r, T - k:]) == [s.category_id for s in seq]
                codes = {"click": 1, "cart": 2, "fav": 3, "buy": 4}
                assert list(b.behaviors[r, T - k:]) == [codes[s.behavior] for s in seq]
                assert (b.ts[r, T - k:] < as_of[r]).all()
        assert b.lengths.sum() > len(users)  # the check above saw real rows


@given(event_logs(), st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_counters_at_are_the_stored_ones_plus_the_batch_s_new_events_before(log, rnd):
    """What apply reports as each impression's counters is what counters_many read just before
    the batch plus the batch's newly applied events (``applied``) strictly before its time, for
    shuffled logs with repeats (in-batch and across batches)."""
    with tempfile.TemporaryDirectory() as d, PartitionStore(d, small()) as store:
        i = 0
        while i < len(log):
            batch = log[i:i + rnd.randint(1, 8)]
            i += len(batch)
            imps = [e for e in batch if isinstance(e, Impression)]
            expected = store.counters_many([e.user_id for e in imps], [e.item_id for e in imps], [e.ts for e in imps])
            got: dict = {}
            applied: set = set()
            store.apply(batch, counters_at=got, applied=applied)
            new = {e.event_id: e for e in batch if e.event_id in applied}.values()
            for e, want in zip(imps, expected):
                for f in new:
                    if f.ts < e.ts and (isinstance(f, Impression) or f.behavior == "click"):
                        kind = "impressions" if isinstance(f, Impression) else "clicks"
                        want[f"user_{kind}"] += f.user_id == e.user_id
                        want[f"item_{kind}"] += f.item_id == e.item_id
            assert [got[id(e)] for e in imps] == expected
            assert [list(got[id(e)]) for e in imps] == [list(c) for c in expected]  # same key order
            assert len(got) == len({id(e) for e in imps})  # the log repeats some objects


def test_counters_at_count_the_batch_s_earlier_events_once(tmp_path):
    """Within one batch, an impression's counters count the earlier impression and click of its
    user and item, not the later ones nor itself; a redelivered batch counts nothing twice."""
    a = Impression(event_id="a", user_id=1, item_id=10, category_id=7, ts=T0)
    c = Click(event_id="c", user_id=1, item_id=10, category_id=7, ts=T0 + 5)
    b = Impression(event_id="b", user_id=1, item_id=10, category_id=7, ts=T0 + 9)
    later = Click(event_id="z", user_id=1, item_id=10, category_id=7, ts=T0 + 20)
    other = Impression(event_id="o", user_id=2, item_id=11, category_id=7, ts=T0 + 9)
    with PartitionStore(tmp_path, small()) as store:
        for attempt in range(2):  # the second is a redelivery: every event already applied
            got: dict = {}
            store.apply([later, b, c, a, a, other], counters_at=got)
            assert got[id(a)] == {"user_impressions": 0.0, "user_clicks": 0.0, "item_impressions": 0.0, "item_clicks": 0.0}
            assert got[id(b)] == {"user_impressions": 1.0, "user_clicks": 1.0, "item_impressions": 1.0, "item_clicks": 1.0}
            assert got[id(other)] == {"user_impressions": 0.0, "user_clicks": 0.0, "item_impressions": 0.0, "item_clicks": 0.0}


def test_histories_many_equal_get_sequence_column_wise(tmp_path):
    log = event_log(4, 3000, users=40, items=30)
    with PartitionStore(tmp_path, small(seq_len=6, extra=4)) as store:
        store.apply(log)
        # repeated users (one decode each), unknown ones, int and str spellings of one id
        users = [e.user_id for e in log[:300:5]] * 2 + ["nobody", 10**9, 7, "7"]
        rng = np.random.default_rng(1)
        as_of = [int(t) for t in rng.integers(log[0].ts - 10, log[-1].ts + 2, size=len(users))]
        for limit in (None, 2, 50):
            got = store.histories_many(users, as_of, limit=limit)
            for u, t, cols in zip(users, as_of, got):
                seq = store.get_sequence(u, as_of=t, limit=limit)
                assert cols == ([b.item_id for b in seq], [b.category_id for b in seq],
                                [b.behavior for b in seq], [b.ts for b in seq])
                assert all(type(c) is list for c in cols)
        assert sum(len(c[0]) for c in got) > len(users)  # real histories were compared


def test_idempotent_batch_changes_no_byte(tmp_path):
    log = event_log(5, 2000, users=20)
    with PartitionStore(tmp_path, small()) as store:
        first = store.apply(log)
        before = list(store.snapshot_items())
        again = store.apply(log)
        assert again["behaviours"] == again["impressions"] == 0
        assert again["duplicates"] + again["too_old"] == len(log)
        assert first["duplicates"] > 0  # the log itself holds redeliveries
        assert list(store.snapshot_items()) == before


def test_offsets_and_caller_state_ride_in_the_same_batch(tmp_path):
    with PartitionStore(tmp_path, small()) as store:
        store.apply([], offsets={("t.clicks", 3): 10, ("t.impressions", 3): 7},
                    extra_changes={b"join/p/a": b"1", b"join/p/b": b"2", b"other": b"x"})
        store.apply([], offsets={("t.clicks", 3): 12}, extra_changes={b"join/p/a": None})
        assert store.committed_offsets() == {("t.clicks", 3): 12, ("t.impressions", 3): 7}
        assert list(store.iter_extra(b"join/")) == [(b"join/p/b", b"2")]
        assert store.get_extra(b"other") == b"x"
        store.apply([], extra_changes={b"join/p/b": None, b"join/p/c": b"3"})  # puts and deletes in one map
        assert list(store.iter_extra(b"join/")) == [(b"join/p/c", b"3")]
        # Caller keys never show up as users or items.
        assert list(store.user_ids()) == []


def test_bad_events_are_rejected_not_crashing(tmp_path):
    with PartitionStore(tmp_path, small()) as store:
        bad = [None, "text", Score(request_id="r", user_id=1, model_version=1, scores=[], ts=T0, latency_ms=1.0)]
        out = store.apply([*bad, Click(event_id="c", user_id=1, item_id=2, category_id=3, ts=T0)])
        assert out["rejected"] == 3 and out["behaviours"] == 1


def test_behaviour_older_than_a_full_sequence_is_too_old(tmp_path):
    with PartitionStore(tmp_path, small(seq_len=3)) as store:
        store.apply([Click(event_id=f"c{k}", user_id=1, item_id=k, category_id=0, ts=T0 + k) for k in range(5)])
        out = store.apply([Click(event_id="late", user_id=1, item_id=99, category_id=0, ts=T0)])
        assert out["too_old"] == 1
        assert [b.item_id for b in store.get_sequence(1)] == [2, 3, 4]
        assert store.counters_as_of(1, 99, None)["user_clicks"] == 5.0  # not counted


def test_forgotten_impression_redelivered_is_not_counted_twice(tmp_path):
    with PartitionStore(tmp_path, small(dedupe_ids_per_user=4)) as store:
        imps = [Impression(event_id=f"i{k}", user_id=1, item_id=k, category_id=0, ts=T0 + k) for k in range(10)]
        store.apply(imps)
        out = store.apply(imps[:3])  # forgotten ids, at or below the memory's floor
        assert out["impressions"] == 0 and out["too_old"] + out["duplicates"] == 3
        assert store.counters_as_of(1, 0, None)["user_impressions"] == 10.0


def test_sweep_drops_inactive_users_and_items_and_stats_report_size(tmp_path):
    day = 86_400_000
    with PartitionStore(tmp_path, small(retention_days=30)) as store:
        store.apply([Impression(event_id="old", user_id="old", item_id="old-item", category_id=0, ts=T0),
                     Click(event_id="new", user_id="new", item_id="new-item", category_id=0, ts=T0 + 40 * day)])
        s = store.stats()
        assert (s["users"], s["items"]) == (2, 2) and s["bytes_on_disk"] > 0
        assert store.sweep(T0 + 45 * day) == {"users": 1, "items": 1}
        assert list(store.user_ids()) == ["new"]
        assert store.item_features("old-item") is None and store.item_features("new-item") is not None
        assert store.stats()["users"] == 1


def test_profile_and_item_side_features_are_latest_known(tmp_path):
    with PartitionStore(tmp_path, small()) as store:
        store.apply([Impression(event_id="a", user_id=1, item_id=5, category_id=2, ts=T0 + 10,
                                user_profile={"age": 30}, item_features={"price": 3.5}),
                     Impression(event_id="b", user_id=1, item_id=5, category_id=2, ts=T0,
                                user_profile={"age": 29}, item_features={"price": 9.0})])
        assert store.user_profile(1) == {"age": 30}
        assert store.item_features(5) == {"category_id": 2, "price": 3.5}


def test_checkpoint_snapshot_and_hand_over(tmp_path):
    cfg = load_settings(overrides={"state_dir": str(tmp_path / "state"), "features.block_cache_mb": 8})
    log = event_log(9, 3000, users=30)
    old_owner = FeatureStore(cfg)
    assert old_owner.assign([0, 1]) == {}
    store = old_owner.partition(0)
    store.apply(log, offsets={("in", 0): len(log)})
    ref = store_sequences(store, {e.user_id for e in log}, 50)
    ck = store.checkpoint(tmp_path / "ck")
    items = list(store.snapshot_items())
    old_owner.revoke([0])  # hand-over: the old owner closes, the new one opens the same directory
    with FeatureStore(cfg) as new_owner:
        assert new_owner.assign([0]) == {("in", 0): len(log)}
        assert store_sequences(new_owner.partition(0), ref, 50) == ref
    old_owner.close()
    # Or from the checkpoint, or from the snapshot's key/values (a compacted changelog).
    PartitionStore.restore(ck, tmp_path / "restored")
    with PartitionStore(tmp_path / "restored") as restored, PartitionStore(tmp_path / "loaded") as loaded:
        loaded.load_items(items, batch_size=500)
        for s in (restored, loaded):
            assert s.committed_offsets() == {("in", 0): len(log)}
            assert store_sequences(s, ref, 50) == ref


def test_read_only_open_sees_a_store_held_by_a_writer(tmp_path):
    with PartitionStore(tmp_path / "p", small()) as writer:
        writer.apply([Click(event_id="c", user_id=1, item_id=2, category_id=3, ts=T0)])
        writer._db.flush()
        with PartitionStore(tmp_path / "p", small(), read_only=True) as reader:
            assert [b.item_id for b in reader.get_sequence(1)] == [2]
            with pytest.raises(Exception):
                reader.apply([Click(event_id="d", user_id=1, item_id=2, category_id=3, ts=T0)])
