"""100 hot swaps (full and delta) under a steady request load: no failed, dropped or duplicated
response, every response's version was live while its request was being answered, and its
scores are that version's (deltas are written in place into a spare replica: a write into a
replica still being read would show here)."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import torch

from streamer.scoring import MicroBatcher, ModelHolder, NoFeatures, Scorer
from streamer.scoring_swap import Swapper
from test_scoring_helpers import FastPublisher, request, small_settings

SWAPS = 100


def test_100_swaps_under_load_lose_nothing(tmp_path):
    s = small_settings(tmp_path)
    pub = FastPublisher(s)
    # Every 5th version full, the rest deltas, all published up front.
    updates = [pub.next("full" if i % 5 == 0 else "delta") for i in range(SWAPS + 1)]
    holder = ModelHolder()
    swapper = Swapper(holder, pub.store, s)
    assert swapper.apply(updates[0])
    swapper.start()
    batcher = MicroBatcher(Scorer(holder, NoFeatures(), s), max_batch=16, max_wait_ms=1.0)

    probe = request(0, n=30)
    results: list[tuple[str, float, float, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            rid = c * 1_000_000 + i
            t0 = time.monotonic()
            req = request(rid, n=1 + rid % 40) if i % 5 else msgspec.structs.replace(probe, request_id=f"r{rid}")
            fut = batcher.submit(req)
            try:
                res = fut.result(timeout=30)
            except Exception as e:  # counted as a failure below
                res = e
            with lock:
                results.append((f"r{rid}", t0, time.monotonic(), res))
            i += 1
            time.sleep(0.002)  # a steady load, not a saturating one (2 shared cores)

    clients = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in clients:
        t.start()
    for u in updates[1:]:  # announcements arrive while requests flow
        swapper.offer(u)
        time.sleep(0.01)
    swapper.drain(120)
    time.sleep(0.2)  # keep the load on past the last swap
    stop.set()
    for t in clients:
        t.join(30)
    batcher.close()
    swapper.stop()

    assert swapper.applied == SWAPS + 1 and not swapper.refused
    assert holder.get().version == updates[-1].version
    failed = [r for r in results if isinstance(r[3], Exception)]
    assert not failed, failed[:3]
    ids = [r[0] for r in results]
    assert len(ids) == len(set(ids)) and len(ids) > 200  # nothing dropped, duplicated; a real load
    served_versions = set()
    for rid, t0, t1, score in results:
        assert score.request_id == rid  # each answer goes to its own request
        assert holder.live_during(score.model_version, t0, t1), (rid, score.model_version)
        served_versions.add(score.model_version)
    assert len(served_versions) > 10  # the load really overlapped the swaps

    # The probe requests' scores are exactly those of the version that answered them, loaded alone
    # from the store; and the final live weights are the store's chain, bit for bit.
    by_version: dict[int, list[list[float]]] = {}
    for rid, _, _, score in results:
        if int(rid[1:]) % 1_000_000 % 5 == 0:
            by_version.setdefault(score.model_version, []).append([x.score for x in score.scores])
    assert len(by_version) > 10
    for version, answers in by_version.items():
        alone = ModelHolder()
        assert Swapper(alone, pub.store, s).apply(updates[version - 1])
        want = [x.score for x in Scorer(alone, NoFeatures(), s).score([probe])[0].scores]
        for got in answers:
            assert got == pytest.approx(want, abs=1e-6), version
    final = pub.store.load(updates[-1].version)
    assert all(torch.equal(final[k], t) for k, t in holder.get().state.items())
