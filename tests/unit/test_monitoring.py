"""Monitoring without a running pipeline: the metric catalogue, the live page's series logic, the
Grafana dashboard and Prometheus config, and docker-compose.yml (Compose specification schema,
vendored in tests/data; every command it runs exists in the CLI)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dmrstream.cli import app
from monitoring.dashboard import Collector, parse_metrics
from monitoring.metrics import catalogue

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- catalogue ------------------------------------------------------------------------------------
def test_catalogue_lists_every_metric_once_with_help():
    cat = catalogue()
    names = [m["name"] for m in cat]
    assert len(names) == len(set(names))
    assert all(n.startswith("dmrstream_") and m["help"] for n, m in zip(names, cat))
    for needed in ("dmrstream_trainer_progressive", "dmrstream_consumer_lag", "dmrstream_events_in_total",
                   "dmrstream_model_version", "dmrstream_model_freshness_seconds", "dmrstream_serving_auc"):
        assert needed in names
    assert {"group", "topic", "partition"} == set(next(m for m in cat if m["name"] == "dmrstream_consumer_lag")["labels"])


# -- the live page's series ---------------------------------------------------------------------
TEXT = """# TYPE dmrstream_trainer_progressive gauge
dmrstream_trainer_progressive{{metric="auc_window"}} {auc}
dmrstream_trainer_progressive{{metric="auc_cumulative"}} 0.6
dmrstream_trainer_progressive{{metric="logloss_window"}} NaN
# TYPE dmrstream_trainer_samples_total counter
dmrstream_trainer_samples_total {samples}
# TYPE dmrstream_events_in_total counter
dmrstream_events_in_total{{component="streamer",topic="p.impressions"}} {imps}
# TYPE dmrstream_serving_auc gauge
dmrstream_serving_auc{{version="7"}} 0.71
# TYPE dmrstream_model_version gauge
dmrstream_model_version{{component="trainer"}} 8
"""


def test_collector_turns_scrapes_into_points_with_rates():
    c = Collector(prefix="p.", rate_window_s=5)
    p0 = c.add(100.0, parse_metrics(TEXT.format(auc=0.65, samples=0, imps=0)), freshness_store=3.0)
    assert p0["auc"] == {"trainer (window)": 0.65, "trainer (cumulative)": 0.6, "serving v7": 0.71}
    assert "logloss (window)" not in p0["quality"]  # NaN never reaches the page
    assert p0["version"] == {"trainer": 8.0} and p0["freshness"] == {"latest published": 3.0}
    c.add(102.0, parse_metrics(TEXT.format(auc=0.66, samples=100, imps=500)))
    p2 = c.add(106.0, parse_metrics(TEXT.format(auc=0.67, samples=300, imps=1500)))
    # Rates over >= 5 s: from t=100 to t=106.
    assert p2["throughput"]["trainer samples"] == pytest.approx(300 / 6)
    assert p2["throughput"]["in impressions"] == pytest.approx(1500 / 6)
    assert [p["auc"]["trainer (window)"] for p in c.since(101.0)] == [0.66, 0.67]
    json.dumps(list(c.points), allow_nan=False)


def test_page_is_plain_and_self_contained():
    static = ROOT / "monitoring" / "static"
    html = (static / "index.html").read_text()
    for f in ("index.html", "app.js", "style.css"):
        text = (static / f).read_text()
        # No request leaves the page's own origin (the SVG namespace is an identifier, not a request).
        urls = [u for u in re.findall(r"https?://[^\s\"'`)]+", text) if u != "http://www.w3.org/2000/svg"]
        assert not urls, (f, urls)
    assert 'src="/static/app.js"' in html and 'id="auc-chart"' in html


# -- Grafana and Prometheus ---------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _deploy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "deploy" / "grafana"))


def test_grafana_dashboard_is_current_and_complete():
    import make_dashboard

    committed = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "dmrstream.json").read_text())
    assert committed == json.loads(json.dumps(make_dashboard.dashboard())), "run deploy/grafana/make_dashboard.py"
    panels = committed["panels"]
    top = min(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    assert top["title"] == "AUC over time" and top["gridPos"]["w"] == 24
    assert any("dmrstream_serving_auc" in t["expr"] for t in top["targets"])
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("logloss", "calibration", "events/s", "lag", "dead letters", "join", "feature-store",
                 "samples/s", "version", "swaps", "latency", "freshness"):
        assert word in titles, word
    known = {m["name"] for m in catalogue()}
    known |= {f"{m['name']}_{s}" for m in catalogue() if m["type"] == "histogram" for s in ("bucket", "count", "sum")}
    for p in panels:
        for t in p["targets"]:
            for name in re.findall(r"dmrstream_[a-z_]+", t["expr"]):
                assert name in known, (p["title"], name)
    prov = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dmrstream.yml").read_text())
    mounts = compose()["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + prov["providers"][0]["options"]["path"] + ":ro") for m in mounts)


def test_prometheus_config_scrapes_every_component():
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    ports = {j["job_name"]: j["dns_sd_configs"][0]["port"] for j in cfg["scrape_configs"]}
    services = compose()["services"]
    for job, port in ports.items():
        cmd = services[job]["command"]
        flag = "--metrics-port" if "--metrics-port" in cmd else "--port"
        assert int(cmd[cmd.index(flag) + 1]) == port, job
    assert set(ports) == {"streamer", "trainer", "scorer", "dashboard"}
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


# -- docker-compose.yml -------------------------------------------------------------------------
def test_compose_validates_against_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    doc = compose()
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    # The schema does catch mistakes (it is not vacuous).
    bad = json.loads(json.dumps(doc))
    bad["services"]["streamer"]["deploy"]["replicas"] = "two"
    bad["services"]["kafka"]["no_such_key"] = 1
    assert len(list(validator.iter_errors(bad))) == 2


def test_compose_has_the_production_shape():
    s = compose()["services"]
    kafka = s["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert s["kafka-init"]["command"] == ["topics", "create"]
    assert s["streamer"]["deploy"]["replicas"] == 2
    gpu = s["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert s["replay"]["profiles"] == ["replay"]
    assert {"scorer", "prometheus", "grafana", "dashboard"} <= set(s)
    for name, svc in s.items():  # published ports stay on loopback
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), (name, p)
    cpu = (ROOT / "deploy" / "compose.cpu.yml").read_text()  # the documented CPU fallback
    assert "!reset" in cpu and "DMRSTREAM_TRAINER__DEVICE: cpu" in cpu
    assert "compose.cpu.yml" in COMPOSE.read_text()


def dmrstream_commands() -> list[list[str]]:
    out = []
    for name, svc in compose()["services"].items():
        if svc.get("image", "").startswith("dmrstream"):
            out.append(svc["command"])
    return out


@pytest.mark.parametrize("command", dmrstream_commands(), ids=lambda c: " ".join(c[:2]))
def test_every_compose_command_exists_in_the_cli(command):
    # The whole command line with --help: unknown commands or options fail, --help prints usage.
    r = CliRunner().invoke(app, [*command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output
    for opt in (c for c in command if c.startswith("--")):
        assert opt in r.output, opt


def test_a_component_metric_is_taken_from_its_owner_only():
    """Every process exports the whole catalogue (a trainer gauge reads 0 in the streamer): the
    merged view keeps the owner's value whatever order the scrapes come in, and adds counters."""
    from monitoring.dashboard import merge_scrapes, parse_metrics

    trainer = parse_metrics("dmrstream_trainer_loss 0.61\ndmrstream_events_in_total{topic=\"s\"} 5\n")
    streamer = parse_metrics("dmrstream_trainer_loss 0\ndmrstream_events_in_total{topic=\"s\"} 7\n"
                             "dmrstream_streamer_pending_impressions{partition=\"0\"} 3\n")
    for order in (("trainer", "streamer-0"), ("streamer-0", "trainer")):
        scrapes = {"trainer": trainer, "streamer-0": streamer}
        merged = merge_scrapes({n: scrapes[n] for n in order})
        assert merged[("dmrstream_trainer_loss", ())] == 0.61
        assert merged[("dmrstream_events_in_total", (("topic", "s"),))] == 12
        assert merged[("dmrstream_streamer_pending_impressions", (("partition", "0"),))] == 3
    # with targets named freely, nothing is dropped
    assert ("dmrstream_trainer_loss", ()) in merge_scrapes({"a": trainer})
