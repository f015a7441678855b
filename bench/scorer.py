"""Scorer benchmark (not a test), default settings (the paper's model shape, 2^20-row tables):

- in-process latency p50/p99 for 1 and 200 candidates (feature-store reads included: read-only
  RocksDB views with 50-behaviour users), candidates/s per core (torch threads = 1);
- the extra p99 latency while versions are loaded and swapped in (deltas and a full);
- Kafka round trip (request produced -> score consumed) on the local broker, 1 and 200 candidates;
- freshness: the event time of a click to the first score from a model that learned from it
  (samples produced as clicks happen, the trainer service with its default schedule, a scorer
  following model-updates). The streamer's join is not in this loop (bench/streamer.py).

    .venv/bin/python bench/scorer.py

The machine has 2 cores shared with other work: noisy figures; compare ratios in one run.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmrstream.allocator import tune_allocator  # noqa: E402
from dmrstream.broker import LocalBroker  # noqa: E402
from dmrstream.contracts import Candidate, Click, Codec, Sample, Score, ScoreRequest, encode  # noqa: E402
from dmrstream.kafkaio import create_topics, make_consumer, make_producer  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from featurestore import open_partition_store  # noqa: E402
from streamer.scoring import ModelHolder, Scorer  # noqa: E402
from streamer.scoring_features import StoreFeatures, partition_of  # noqa: E402
from streamer.scoring_service import ScorerService  # noqa: E402
from streamer.scoring_swap import Swapper  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.modelstore import ModelStore, split_delta  # noqa: E402

T0 = 1_700_000_000_000
USERS, ITEMS = 2_000, 50_000
console = Console()


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


class Versions:
    """Versions of the default-shape model, published as the trainer does (full / delta)."""

    def __init__(self, settings):
        model = build_model(settings, "dmr")
        self.sparse = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model
        self.store = ModelStore(settings.model_store)
        self.v = 0

    def next(self, kind):
        from dmrstream.contracts import ModelUpdate

        touched = {}
        for name in self.sparse:  # ~ what 10 s of training touches
            rows = torch.randint(1, self.state[name].shape[0], (5_000,))
            self.state[name][rows] += 0.001
            touched[name] = rows
        base = self.v if (kind == "delta" and self.v) else None
        kind = "delta" if base else "full"
        tensors = self.state if kind == "full" else split_delta(self.state, touched, self.sparse)
        meta = self.store.publish(self.v + 1, kind, tensors, base_version=base, trained_until_ts=T0, samples_seen=0)
        self.v += 1
        return ModelUpdate(version=meta.version, kind=kind, base_version=base, uri=self.store.uri_of(meta),
                           sha256=meta.sha256, created_at=meta.created_at, trained_until_ts=T0, samples_seen=0)


def fill_feature_store(settings):
    """USERS users with 50 clicks each, in their partitions' stores (the streamer's layout)."""
    rng = random.Random(1)
    by_part: dict[int, list] = {}
    for u in range(USERS):
        for j in range(50):
            item = int(rng.paretovariate(1.2)) % ITEMS
            by_part.setdefault(partition_of(u, settings.topics.partitions), []).append(
                Click(event_id=f"c{u}-{j}", user_id=u, item_id=item, category_id=item % 500, ts=T0 + j * 60_000))
    for p, events in by_part.items():
        with open_partition_store(settings, p) as store:
            store.apply(events)


def req(i, n):
    rng = random.Random(i)
    return ScoreRequest(request_id=f"q{i}", user_id=i % USERS, ts=T0 + 10**8 + i,
                        candidates=[Candidate(item_id=rng.randrange(ITEMS), category_id=rng.randrange(500))
                                    for _ in range(n)])


def latencies(scorer, n_cands, count, stop_after=None):
    out = []
    for i in range(count):
        r = req(i, n_cands)
        t = time.perf_counter()
        scorer.score([r])
        out.append(time.perf_counter() - t)
        if stop_after is not None and stop_after.is_set():
            break
    return out


def throughput(scorer, n_cands, per_pass, seconds=6.0):
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        scorer.score([req(i + k, n_cands) for k in range(per_pass)])
        done += n_cands * per_pass
        i += per_pass
    return done / (time.perf_counter() - start)


def forward_paths(scorer, res):
    """The model's forward alone for one 200-candidate request, group by group (the default for
    large groups) vs rows gathered per group (what many small groups take), same batches."""
    import trainer.model as model_module
    from streamer.scoring import requests_batch

    rs = [req(i, 200) for i in range(30)]
    batches = [requests_batch([r], scorer.features.lookup([r], [None]), scorer.settings).to_torch() for r in rs]
    model = scorer.holder.get().model
    default = model_module.SEGMENT_MIN_ROWS
    for name, threshold in (("segment", default), ("gather", 10**9)):
        model_module.SEGMENT_MIN_ROWS = threshold
        times = []
        with torch.inference_mode():
            for b in batches * 3:
                t = time.perf_counter()
                model(b)
                times.append(time.perf_counter() - t)
        res[f"forward_200_{name}_p50_ms"] = pct(times[len(batches):], 50)
    model_module.SEGMENT_MIN_ROWS = default


def gil_gaps(store):
    """Longest stall of a 1 ms ticker thread while the newest full version is read by the store
    (trainer/tensorfile.py) vs by ``safetensors.torch.load`` on the same bytes: how long a serving
    thread could not run Python during a full load."""
    from safetensors.torch import load as st_load

    meta = next(m for m in reversed(store.versions()) if m.kind == "full")
    raw = Path(store.path, meta.file).read_bytes()
    out = []
    for read in (lambda: store.read_verified(meta.file, meta.sha256), lambda: st_load(raw)):
        gaps, stop = [0.0], threading.Event()

        def tick():
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps[0], last = max(gaps[0], now - last), now
        th = threading.Thread(target=tick)
        th.start()
        time.sleep(0.05)
        read()
        stop.set()
        th.join()
        out.append(gaps[0] * 1000)
    return out


def in_process(settings, versions, res):
    holder = ModelHolder()
    swapper = Swapper(holder, versions.store, settings)
    t = time.perf_counter()
    assert swapper.apply(versions.next("full"))
    res["full_load_validate_s"] = time.perf_counter() - t
    feats = StoreFeatures(settings, refresh=False)
    scorer = Scorer(holder, feats, settings)
    latencies(scorer, 200, 20)  # warm-up
    for n in (1, 200):
        lat = latencies(scorer, n, 300 if n == 1 else 150)
        res[f"inproc_{n}_p50_ms"], res[f"inproc_{n}_p99_ms"] = pct(lat, 50), pct(lat, 99)
    res["cands_per_s_per_core_200x8"] = throughput(scorer, 200, 8)
    res["cands_per_s_per_core_1x256"] = throughput(scorer, 1, 256, 4.0)
    forward_paths(scorer, res)
    res["full_read_max_gil_gap_ms"], res["safetensors_load_max_gil_gap_ms"] = gil_gaps(versions.store)
    # swaps: 20 deltas back to back, then one full, on the loader thread while 200-candidate requests run
    base = latencies(scorer, 200, 150)
    ups = [versions.next("delta") for _ in range(20)] + [versions.next("full")]
    stop = threading.Event()
    swap_times = []
    loading = ["delta"]

    def swap_all():
        for u in ups:
            loading[0] = u.kind
            t = time.perf_counter()
            swapper.apply(u)
            swap_times.append(time.perf_counter() - t)
        stop.set()
    th = threading.Thread(target=swap_all)
    th.start()
    during, during_delta = [], []
    while not stop.is_set():
        kind = loading[0]
        lat = latencies(scorer, 200, 5, stop)
        during += lat
        if kind == "delta" and loading[0] == "delta":
            during_delta += lat
    th.join()
    res["swap_during_delta_p99_ms"] = pct(during_delta, 99)
    res["swap_extra_delta_p99_ms"] = res["swap_during_delta_p99_ms"] - pct(base, 99)
    res["swap_base_p99_ms"], res["swap_during_p99_ms"] = pct(base, 99), pct(during, 99)
    res["swap_extra_p99_ms"] = res["swap_during_p99_ms"] - res["swap_base_p99_ms"]
    res["swap_during_p50_ms"], res["swap_base_p50_ms"] = pct(during, 50), pct(base, 50)
    res["delta_load_validate_p50_s"] = float(np.median(swap_times[:-1]))
    res["swaps_during_requests"] = len(swap_times)
    res["requests_during_swaps"] = len(during)
    feats.close()
    return holder


def kafka_round_trip(settings, versions, res):
    create_topics(settings)
    p = make_producer(settings, linger_ms=0)
    p.send(settings.topics.name("model_updates"), key=b"model", value=encode(versions.next("full"))).get(30)
    stop = threading.Event()
    service = ScorerService(settings, stop)
    th = threading.Thread(target=service.run, daemon=True)
    th.start()
    c = make_consumer(settings, None, [settings.topics.name("scores")], fetch_max_wait_ms=5)
    codec = Codec(Score)
    # warm-up: until the group is joined and the first answer comes back
    deadline = time.monotonic() + 90
    got = False
    i = 10**6
    while not got and time.monotonic() < deadline:
        r = req(i, 1)
        p.send(settings.topics.name("score_requests"), key=str(r.user_id).encode(), value=encode(r)).get(10)
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end and not got:
            got = any(codec.decode(m.value).request_id == r.request_id for ms in c.poll(100).values() for m in ms)
        i += 1
    for n, count in ((1, 150), (200, 100)):
        lat = []
        for k in range(count):
            r = req(2 * 10**6 + n * 1000 + k, n)
            t = time.perf_counter()
            p.send(settings.topics.name("score_requests"), key=str(r.user_id).encode(), value=encode(r))
            p.flush()
            done = False
            while not done and time.perf_counter() - t < 10:
                done = any(codec.decode(m.value).request_id == r.request_id for ms in c.poll(20).values() for m in ms)
            lat.append(time.perf_counter() - t)
        res[f"kafka_{n}_p50_ms"], res[f"kafka_{n}_p99_ms"] = pct(lat, 50), pct(lat, 99)
    stop.set()
    th.join(30)
    c.close()
    p.close()


def freshness(settings, res, seconds=75.0):
    """Samples produced as their clicks happen (event time = now); the trainer service with its
    default schedule learns and publishes; a scorer follows. Freshness of a click = the time the
    scorer first serves a version with trained_until_ts >= its event time, minus that time."""
    from trainer import service as trainer_service

    create_topics(settings)
    stop = threading.Event()
    tr = threading.Thread(target=trainer_service.run, args=(settings, "dmr", "cpu"), kwargs={"stop": stop},
                          daemon=True)
    tr.start()
    sc = ScorerService(settings, stop)
    scth = threading.Thread(target=sc.run, daemon=True)
    scth.start()
    p = make_producer(settings)
    rng = random.Random(3)
    clicks: list[int] = []
    swaps: list[tuple[float, int]] = []  # (wall time served, trained_until_ts)
    seen = 0
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < seconds:
        now = int(time.time() * 1000)
        for _ in range(20):  # ~200 samples/s
            u = rng.randrange(USERS)
            n = rng.randrange(0, 20)
            smp = Sample(sample_id=f"f{k}", event_id=f"f{k}", user_id=u, item_id=rng.randrange(ITEMS),
                         category_id=rng.randrange(500), ts=now, label=int(rng.random() < 0.3),
                         hist_item_ids=[rng.randrange(ITEMS) for _ in range(n)], hist_category_ids=[1] * n,
                         hist_behaviors=["click"] * n, hist_ts=[now - 1000 - j for j in range(n)][::-1])
            if smp.label:
                clicks.append(now)
            p.send(settings.topics.name("samples"), key=str(u).encode(), value=encode(smp))
            k += 1
        time.sleep(0.1)
        h = sc.holder.history
        while seen < len(h):
            live = sc.holder.get()
            swaps.append((time.time(), live.trained_until_ts if live else 0))
            seen += 1
    stop.set()
    p.close()
    tr.join(60)
    scth.join(30)
    fresh = []
    for ts in clicks:
        first = next((t for t, until in swaps if until >= ts), None)
        if first is not None:
            fresh.append(first - ts / 1000)
    res["freshness_p50_s"] = float(np.median(fresh)) if fresh else float("nan")
    res["freshness_p90_s"] = float(np.percentile(fresh, 90)) if fresh else float("nan")
    res["freshness_clicks_measured"] = len(fresh)
    res["freshness_versions_served"] = len(swaps)


def main():
    res: dict[str, float] = {"malloc_tuned": float(tune_allocator())}  # as every dmrstream process
    started = time.perf_counter()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        s = load_settings(overrides={"state_dir": f"{tmp}/state", "model_store": f"{tmp}/models",
                                     "metrics.scorer_port": 0, "metrics.trainer_port": 0})
        fill_feature_store(s)
        versions = Versions(s)
        in_process(s, versions, res)
        with LocalBroker(log_file=Path(tmp) / "tansu.log") as b:
            ks = load_settings(overrides={"state_dir": f"{tmp}/state", "model_store": f"{tmp}/models",
                                          "kafka.bootstrap_servers": b.bootstrap, "kafka.session_timeout_ms": 6000,
                                          "topics.prefix": "bench."})
            kafka_round_trip(ks, versions, res)
            fs = load_settings(overrides={"state_dir": f"{tmp}/fstate", "model_store": f"{tmp}/fmodels",
                                          "kafka.bootstrap_servers": b.bootstrap, "kafka.session_timeout_ms": 6000,
                                          "topics.prefix": "fresh."})
            freshness(fs, res)
    res["total_s"] = time.perf_counter() - started
    table = Table("figure", "value", title="scorer benchmark (default settings, torch threads = 1, 2 shared cores)")
    for k, v in res.items():
        table.add_row(k, f"{v:,.2f}")
    console.print(table)
    print(json.dumps({k: round(v, 3) for k, v in res.items()}))


if __name__ == "__main__":
    main()
