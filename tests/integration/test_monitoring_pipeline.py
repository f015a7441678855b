"""Monitoring on a real running pipeline: the demo (shortened) runs once for the module, on its own
local broker, exactly as a user starts it. While it runs:

- a real Prometheus server (Debian's ``prometheus``) scrapes every component with the scrape
  config of ``deploy/prometheus.yml`` (targets rewritten to the demo's loopback ports), and a
  PromQL query returns the AUC series with values in (0, 1);
- headless Chromium (Debian's ``chromium``, driven by Playwright's library with the system
  browser) loads the live page with no request outside the page's own origin, and the AUC chart
  has points from the pipeline that change over time.

Then the demo ends by itself: exit 0, no process left behind, and its summary reports a
progressive AUC above the item-popularity baseline over the same impressions.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
DURATION_S = 110  # long enough for the model to clear the popularity baseline with margin
SMALL = {"model.item_vocab_size": 4096, "model.user_vocab_size": 4096, "model.category_vocab_size": 256,
         "model.aux_negatives": 32, "model.batch_size": 64, "trainer.delta_every_s": 3,
         "scorer.rollback_min_samples": 1_000_000}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class DemoRun:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ports = {"streamer": free_port(), "trainer": free_port(), "scorer": free_port(),
                      "dashboard": free_port()}
        self.summary = tmp / "summary.json"
        self.workdir = tmp / "work"
        self.page = f"http://127.0.0.1:{self.ports['dashboard']}/"
        cmd = [sys.executable, "-m", "dmrstream", "--log-level", "WARNING"]
        sets = dict(SMALL) | {"metrics.streamer_port": self.ports["streamer"],
                              "metrics.trainer_port": self.ports["trainer"],
                              "metrics.scorer_port": self.ports["scorer"]}
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        cmd += ["demo", "--duration", str(DURATION_S), "--events-per-s", "300", "--device", "cpu",
                "--dashboard-port", str(self.ports["dashboard"]), "--workdir", str(self.workdir),
                "--summary-json", str(self.summary), "--no-live"]
        self.out = open(tmp / "demo.out", "w+b")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=os.environ | {"COLUMNS": "120"})

    def output(self) -> str:
        return (self.tmp / "demo.out").read_text(errors="replace")

    def wait_for_auc(self, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"demo ended early:\n{self.output()[-3000:]}"
            try:
                data = get_json(self.page + "api/series")
                if any(p["auc"] for p in data["points"]):
                    return data
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"no AUC on the page after {timeout_s} s:\n{self.output()[-3000:]}")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = DemoRun(tmp_path_factory.mktemp("demo"))
    yield run
    if run.proc.poll() is None:  # a failed test must not leave the pipeline running
        run.proc.terminate()
        try:
            run.proc.wait(60)
        except subprocess.TimeoutExpired:
            run.proc.kill()


def test_prometheus_scrapes_the_running_pipeline(demo_run, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("Debian's prometheus is not installed (make system-deps installs it as root)")
    # The repository's scrape config, each job's service discovery pointed at the demo's ports.
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    assert jobs == {"streamer", "trainer", "scorer", "dashboard"}
    for job in cfg["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{demo_run.ports[job['job_name']]}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    api = f"http://127.0.0.1:{port}/api/v1/"
    try:
        demo_run.wait_for_auc()
        query = 'dmrstream_trainer_progressive{metric="auc_window"}'
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline:
            try:
                r = get_json(api + "query?" + urllib.parse.urlencode({"query": query}))
                result = r["data"]["result"]
                if result:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        value = float(result[0]["value"][1])
        assert 0.0 < value < 1.0
        assert result[0]["metric"]["job"] == "trainer"
        # A series over time, every point a probability-scale AUC.
        time.sleep(3)
        now = time.time()
        r = get_json(api + "query_range?" + urllib.parse.urlencode(
            {"query": query, "start": now - 120, "end": now, "step": "1"}))
        values = [float(v) for _, v in r["data"]["result"][0]["values"]]
        assert len(values) >= 2 and all(0.0 < v < 1.0 for v in values)
        # Every component is up for Prometheus.
        up = get_json(api + "query?" + urllib.parse.urlencode({"query": "up"}))["data"]["result"]
        assert {x["metric"]["job"]: x["value"][1] for x in up} == {j: "1" for j in jobs}
    finally:
        proc.terminate()
        proc.wait(30)


def test_live_page_in_headless_chromium(demo_run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make system-deps installs it as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    demo_run.wait_for_auc()
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                    headless=True, args=CHROMIUM_ARGS,
                                                    viewport={"width": 1400, "height": 1000})
        try:
            ctx.on("request", lambda req: requests.append(req.url))
            page = ctx.new_page()
            page.goto(demo_run.page, wait_until="load")
            page.wait_for_function("() => +document.getElementById('auc-chart').dataset.points > 0", timeout=30_000)
            first = page.evaluate("() => window.dmr.points.filter(p => Object.keys(p.auc).length)"
                                  ".map(p => [p.t, p.auc])")
            paths = page.locator("#auc-chart path").count()
            time.sleep(8)
            later = page.evaluate("() => window.dmr.points.filter(p => Object.keys(p.auc).length)"
                                  ".map(p => [p.t, p.auc])")
            n_chart = int(page.get_attribute("#auc-chart", "data-points"))
            if os.environ.get("DMRSTREAM_SCREENSHOT"):
                page.screenshot(path=os.environ["DMRSTREAM_SCREENSHOT"], full_page=True)
        finally:
            ctx.close()
    assert paths >= 1, "the AUC chart drew no line"
    assert n_chart >= len(later) >= 2
    assert len(later) > len(first), "no new AUC points while the pipeline ran"
    assert later[-1][0] > first[-1][0]
    values = {json.dumps(a, sort_keys=True) for _, a in later}
    assert len(values) > 1, "the AUC values never changed"
    assert all(0.0 <= v <= 1.0 for _, a in later for v in a.values())
    origin = demo_run.page.rstrip("/")
    external = [u for u in requests if not u.startswith(origin + "/")]
    assert not external, f"requests outside the page's origin: {external}"
    assert any(u.endswith("/static/app.js") for u in requests)


def test_demo_ends_clean_and_beats_the_popularity_baseline(demo_run):
    try:
        rc = demo_run.proc.wait(DURATION_S + 120)
    except subprocess.TimeoutExpired:
        pytest.fail("the demo did not end by itself")
    out = demo_run.output()
    assert rc == 0, out[-4000:]
    assert "dmrstream demo: summary" in out
    s = json.loads(demo_run.summary.read_text())
    assert s["processes_left"] == 0 and not s["failures"], s
    assert set(s["exit_codes"]) >= {"broker", "streamer", "trainer", "dashboard", "stream"}
    # Nothing of the demo survives: no process mentions its work directory or its ports.
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(demo_run.workdir) in cmdline or f"--port {demo_run.ports['dashboard']}" in cmdline:
                left.append(cmdline)
    assert not left, left
    assert s["samples_learned"] > 500
    assert s["popularity_auc"] is not None and 0.5 < s["popularity_auc"] < s["oracle_auc"]
    # Same impressions on both sides: the stream up to the event time the model has learned.
    assert s["reference_until_ts"] is not None, s
    assert s["auc_cumulative"] > s["popularity_auc"], s
    assert s["versions_published"] >= 2
