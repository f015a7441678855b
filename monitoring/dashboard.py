"""``dmrstream dashboard``: the built-in live page for machines without Grafana.

One aiohttp process scrapes every component's ``/metrics`` itself (prometheus-client's text
parser), keeps a bounded time series in memory and serves:

- ``/``: a plain HTML page (``monitoring/static/``, no external script, font or stylesheet) whose
  self-written SVG charts poll ``/api/series``: AUC over time as the headline (trainer
  progressive AUC, window and cumulative; serving AUC per model version when scorers export it),
  throughput per topic, trainer samples/s, consumer lag, model versions, freshness, logloss and
  calibration;
- ``/api/series?since=T``: the points newer than ``T`` (epoch seconds) plus the current state;
- ``/metrics``: this process' own metrics (consumer lag per group and partition, model freshness),
  so Prometheus can scrape them too.

It binds to loopback unless told otherwise (``metrics.bind``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dmrstream.settings import Settings
from monitoring import metrics

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
MAX_POINTS = 3600

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> ``{(sample name, sorted label pairs): value}``."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _pick(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    want = set(labels.items())
    return [(dict(lbl), v) for (n, lbl), v in samples.items() if n == name and want <= set(lbl)]


_OWNERS = (("dmrstream_trainer_", "trainer"), ("dmrstream_publish_", "trainer"), ("dmrstream_scorer_", "scorer"),
           ("dmrstream_serving_", "scorer"), ("dmrstream_streamer_", "streamer"), ("dmrstream_featurestore_", "streamer"),
           ("dmrstream_join_", "streamer"))


def _owner(metric: str) -> str | None:
    """The component a metric family belongs to, by its name (None: shared by all)."""
    for prefix, owner in _OWNERS:
        if metric.startswith(prefix):
            return owner
    return None


def _serves(target: str, owner: str) -> bool:
    """Whether a scrape target named ``target`` is that component ("streamer", "streamer-1")."""
    return target == owner or target.startswith(owner + "-")


def merge_scrapes(scrapes: dict[str, Samples]) -> Samples:
    """One sample dict from every target's scrape: counters (``*_total``) add up across
    processes; a component's own metric family is taken only from that component, because every
    process exports the whole catalogue (a trainer gauge reads 0 in the streamer's process)."""
    merged: Samples = {}
    present = {o for _, o in _OWNERS if any(_serves(n, o) for n in scrapes)}
    for name, samples in scrapes.items():
        for k, v in samples.items():
            owner = _owner(k[0])
            if owner in present and not _serves(name, owner):
                continue
            merged[k] = merged.get(k, 0.0) + v if k[0].endswith("_total") else v
    return merged


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


@dataclass
class Snapshot:
    """Everything one tick derives from the scraped samples (JSON-ready)."""

    t: float
    auc: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    lag: dict[str, float] = field(default_factory=dict)
    version: dict[str, float] = field(default_factory=dict)
    freshness: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    pipeline: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in ("t", "auc", "throughput", "lag", "version", "freshness",
                                               "quality", "pipeline")}


class Collector:
    """Turns successive scrapes (one merged sample dict per tick) into :class:`Snapshot` points."""

    def __init__(self, prefix: str = "", max_points: int = MAX_POINTS, rate_window_s: float = 5.0):
        self.prefix = prefix
        self.points: deque[dict] = deque(maxlen=max_points)
        self.rate_window_s = rate_window_s  # rates over at least this long (components work in bursts)
        self._history: deque[tuple[float, dict[str, float]]] = deque()
        self.totals: dict[str, float] = {}

    def _topic(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def add(self, t: float, s: Samples, freshness_store: float | None = None) -> dict:
        snap = Snapshot(t=round(t, 3))
        for lbl, v in _pick(s, "dmrstream_trainer_progressive"):
            m = lbl.get("metric", "")
            if _finite(v) is None:
                continue
            if m == "auc_window":
                snap.auc["trainer (window)"] = v
            elif m == "auc_cumulative":
                snap.auc["trainer (cumulative)"] = v
            elif m == "logloss_window":
                snap.quality["logloss (window)"] = v
            elif m == "ctr_predicted_window":
                snap.quality["predicted CTR"] = v
            elif m == "ctr_actual_window":
                snap.quality["actual CTR"] = v
        for lbl, v in _pick(s, "dmrstream_serving_auc"):
            if _finite(v) is not None:
                snap.auc[f"serving v{lbl.get('version', '?')}"] = v
        for lbl, v in _pick(s, "dmrstream_model_version"):
            snap.version[lbl.get("component", "?")] = v
        for lbl, v in _pick(s, "dmrstream_scorer_freshness_seconds"):
            snap.freshness["scorer"] = v
        if freshness_store is not None:
            snap.freshness["latest published"] = freshness_store
        for lbl, v in _pick(s, "dmrstream_consumer_lag"):
            g = self._topic(lbl.get("group", "?"))
            snap.lag[g] = snap.lag.get(g, 0.0) + v
        for lbl, v in _pick(s, "dmrstream_trainer_loss"):
            if _finite(v) is not None:
                snap.quality["loss (last batch)"] = v

        # Rates from counters: totals now vs the previous scrape.
        totals: dict[str, float] = {}
        for lbl, v in _pick(s, "dmrstream_events_in_total"):
            k = f"in {self._topic(lbl.get('topic', '?'))}"
            totals[k] = totals.get(k, 0.0) + v
        for lbl, v in _pick(s, "dmrstream_events_out_total"):
            k = f"out {self._topic(lbl.get('topic', '?'))}"
            totals[k] = totals.get(k, 0.0) + v
        for _, v in _pick(s, "dmrstream_trainer_samples_total"):
            totals["trainer samples"] = totals.get("trainer samples", 0.0) + v
        pipe: dict[str, float] = {}
        for lbl, v in _pick(s, "dmrstream_join_outcomes_total"):
            pipe[f"join {lbl.get('outcome', '?')}"] = pipe.get(f"join {lbl.get('outcome', '?')}", 0.0) + v
        for _, v in _pick(s, "dmrstream_dead_letters_total"):
            pipe["dead letters"] = pipe.get("dead letters", 0.0) + v
        for lbl, v in _pick(s, "dmrstream_scorer_swaps_total"):
            pipe["swaps"] = pipe.get("swaps", 0.0) + v
        totals.update(pipe)
        self.totals = totals
        if self._history:
            # The newest earlier scrape at least rate_window_s old (else the oldest one kept).
            base = self._history[0]
            for h in self._history:
                if t - h[0] >= self.rate_window_s:
                    base = h
            t0, prev_totals = base
            dt = max(1e-3, t - t0)
            for k, v in totals.items():
                if k in pipe:
                    continue
                d = v - prev_totals.get(k, 0.0)
                snap.throughput[k] = round((d if d >= 0 else v) / dt, 3)
        snap.pipeline = pipe
        self._history.append((t, totals))
        while len(self._history) > 2 and t - self._history[1][0] >= self.rate_window_s:
            self._history.popleft()
        point = snap.as_json()
        self.points.append(point)
        return point

    def since(self, t: float) -> list[dict]:
        return [p for p in self.points if p["t"] > t]


class Dashboard:
    """The scraper, the in-memory series and the HTTP app."""

    def __init__(self, settings: Settings, targets: dict[str, str], interval_s: float = 2.0,
                 reference: dict[str, float] | None = None, lag: bool = True, model_store: bool = True):
        self.settings = settings
        self.targets = targets
        self.interval_s = interval_s
        self.reference = reference or {}
        self.collector = Collector(settings.topics.prefix)
        self.up: dict[str, bool] = {name: False for name in targets}
        self.versions: list[dict] = []
        self.started = time.time()
        self._stop = threading.Event()
        self._lag = lag
        self._model_store = model_store

    # -- scraping -------------------------------------------------------------------------------
    async def _scrape_one(self, session, name: str, url: str) -> Samples:
        import aiohttp

        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=max(1.0, self.interval_s))) as r:
                text = await r.text()
            self.up[name] = r.status == 200
            metrics.DASHBOARD_SCRAPES.labels(name, "ok" if r.status == 200 else "error").inc()
            return parse_metrics(text) if r.status == 200 else {}
        except Exception:
            self.up[name] = False
            metrics.DASHBOARD_SCRAPES.labels(name, "error").inc()
            return {}

    def _read_store(self, now_ms: float | None = None) -> float | None:
        """Model versions (for the timeline) and freshness of the newest published one."""
        from trainer.modelstore import ModelStore

        try:
            versions = ModelStore(self.settings.model_store).versions()
        except Exception:
            return None
        self.versions = [{"version": v.version, "kind": v.kind, "created_at": v.created_at,
                          "trained_until_ts": v.trained_until_ts, "samples_seen": v.samples_seen,
                          "auc_window": _finite(v.metrics.get("auc_window"))} for v in versions[-200:]]
        if not versions:
            return None
        # On the stream's clock (the streamer's watermark) when known: a replay of old logs
        # reports how far the model trails the stream, not the years since the data was made.
        now = now_ms / 1000 if now_ms else time.time()
        fresh = max(0.0, now - versions[-1].trained_until_ts / 1000)
        metrics.MODEL_FRESHNESS.set(fresh)
        return fresh

    def own_samples(self) -> Samples:
        return parse_metrics(generate_latest(REGISTRY).decode())

    async def tick(self, session) -> dict:
        results = await asyncio.gather(*(self._scrape_one(session, n, u) for n, u in self.targets.items()))
        merged = merge_scrapes(dict(zip(self.targets, results)))
        watermarks = [v for (n, _), v in merged.items() if n == "dmrstream_streamer_watermark_ms" and v > 0]
        event_now = max(watermarks) if watermarks else None
        fresh = await asyncio.to_thread(self._read_store, event_now) if self._model_store else None
        for k, v in self.own_samples().items():
            if k[0] == "dmrstream_consumer_lag":
                merged[k] = v
        return self.collector.add(time.time(), merged, fresh)

    async def scrape_forever(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    await self.tick(session)
                except Exception:  # never let one bad scrape end the page
                    log.exception("dashboard tick failed")
                await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - started)))

    # -- HTTP -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"targets": [{"name": n, "url": u, "up": self.up.get(n, False)} for n, u in self.targets.items()],
                "versions": self.versions, "reference": self.reference, "started": self.started,
                "interval_s": self.interval_s, "totals": self.collector.totals,
                "prefix": self.settings.topics.prefix}

    def make_app(self):
        from aiohttp import web

        async def index(_request):
            return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

        async def series(request):
            try:
                since = float(request.query.get("since", "0"))
            except ValueError:
                since = 0.0
            return web.json_response({"points": self.collector.since(since), **self.state()},
                                     dumps=_dumps)

        async def prom(_request):
            return web.Response(body=generate_latest(REGISTRY), content_type="text/plain", charset="utf-8",
                                headers={"X-Content-Type": "version=0.0.4"})

        async def health(_request):
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_get("/api/series", series)
        app.router.add_get("/metrics", prom)
        app.router.add_get("/healthz", health)
        app.router.add_static("/static/", STATIC)
        return app

    async def serve(self, host: str, port: int, ready: threading.Event | None = None) -> None:
        from aiohttp import web

        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        lag_thread = None
        if self._lag:
            from monitoring.lag import LagMonitor

            lag_thread = threading.Thread(target=LagMonitor(self.settings).run, args=(self._stop,), daemon=True,
                                          name="lag")
            lag_thread.start()
        if ready is not None:
            ready.set()
        try:
            await self.scrape_forever()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        self._stop.set()


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, allow_nan=False, default=str, separators=(",", ":"))


def default_targets(settings: Settings, host: str = "127.0.0.1", streamer_workers: int = 1) -> dict[str, str]:
    """The components' /metrics addresses from the settings' ports (0 = not exported)."""
    m = settings.metrics
    out = {}
    for i in range(streamer_workers):
        if m.streamer_port:
            out[f"streamer-{i}" if streamer_workers > 1 else "streamer"] = f"http://{host}:{m.streamer_port + i}/metrics"
    if m.trainer_port:
        out["trainer"] = f"http://{host}:{m.trainer_port}/metrics"
    if m.scorer_port:
        out["scorer"] = f"http://{host}:{m.scorer_port}/metrics"
    return out


def run_dashboard(settings: Settings, targets: dict[str, str], host: str, port: int, interval_s: float = 2.0,
                  reference: dict[str, float] | None = None, lag: bool = True) -> None:
    """Serve until SIGTERM/SIGINT."""
    import signal

    dash = Dashboard(settings, targets, interval_s, reference, lag)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(dash.serve(host, port))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, dash.stop)
        await task

    asyncio.run(main())
