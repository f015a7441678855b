"""Writes deploy/grafana/dashboards/dmrstream.json (run after changing a panel; the JSON is committed).

Headline: AUC over time (trainer progressive AUC, window and cumulative; serving AUC per model
version). Then logloss, calibration, events/s per topic, consumer lag, dead letters, join outcomes,
feature-store latency, trainer samples/s, model version timeline and swaps, scorer latency
p50/p99, freshness.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "prometheus"}


def panel(pid, title, targets, x, y, w, h, unit="short", description="", minv=None, maxv=None, kind="timeseries",
          draw="line"):
    defaults = {"unit": unit, "custom": {"drawStyle": draw, "lineWidth": 2, "showPoints": "never",
                                         "spanNulls": True}}
    if minv is not None:
        defaults["min"] = minv
    if maxv is not None:
        defaults["max"] = maxv
    return {"id": pid, "type": kind, "title": title, "description": description, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "calcs": ["lastNotNull"]},
                        "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
                        for i, (e, l) in enumerate(targets)]}


def q(expr_p, stage="request"):
    return f'histogram_quantile({expr_p}, sum by (le) (rate(dmrstream_scorer_seconds_bucket{{stage="{stage}"}}[1m])))'


PANELS = [
    panel(1, "AUC over time", [
        ('dmrstream_trainer_progressive{metric="auc_window"}', "trainer progressive (window)"),
        ('dmrstream_trainer_progressive{metric="auc_cumulative"}', "trainer progressive (cumulative)"),
        ("max by (version) (dmrstream_serving_auc)", "serving v{{version}}"),
    ], 0, 0, 24, 10, unit="percentunit", minv=0.4, maxv=1.0,
        description="Progressive AUC: every sample scored before it is learned (window = last 20k). "
                    "Serving AUC: the scores a model version actually served, joined with their labels."),
    panel(2, "Logloss", [('dmrstream_trainer_progressive{metric="logloss_window"}', "logloss (window)"),
                         ("dmrstream_trainer_loss", "training loss (last batch)")], 0, 10, 8, 8),
    panel(3, "Calibration (CTR)", [('dmrstream_trainer_progressive{metric="ctr_predicted_window"}', "predicted"),
                                   ('dmrstream_trainer_progressive{metric="ctr_actual_window"}', "actual")],
          8, 10, 8, 8, unit="percentunit", minv=0),
    panel(4, "Freshness", [("max(dmrstream_scorer_freshness_seconds)", "serving model (scorer)"),
                           ("max(dmrstream_model_freshness_seconds)", "latest published")], 16, 10, 8, 8,
          unit="s", minv=0, description="Now minus the newest event time the model has learned from."),
    panel(5, "Events/s per topic", [("sum by (topic) (rate(dmrstream_events_in_total[1m]))", "in {{topic}}"),
                                    ("sum by (topic) (rate(dmrstream_events_out_total[1m]))", "out {{topic}}")],
          0, 18, 8, 8, unit="ops"),
    panel(6, "Consumer lag", [("sum by (group, topic) (dmrstream_consumer_lag)", "{{group}} {{topic}}")],
          8, 18, 8, 8, minv=0),
    panel(7, "Dead letters/s", [("sum by (topic, reason) (rate(dmrstream_dead_letters_total[5m]))",
                                 "{{topic}} {{reason}}")], 16, 18, 8, 8, unit="ops", minv=0),
    panel(8, "Join outcomes/s", [("sum by (outcome) (rate(dmrstream_join_outcomes_total[1m]))", "{{outcome}}")],
          0, 26, 8, 8, unit="ops", minv=0),
    panel(9, "Feature-store latency", [
        ("histogram_quantile(0.5, sum by (le, op) (rate(dmrstream_featurestore_seconds_bucket[1m])))", "p50 {{op}}"),
        ("histogram_quantile(0.99, sum by (le, op) (rate(dmrstream_featurestore_seconds_bucket[1m])))", "p99 {{op}}"),
    ], 8, 26, 8, 8, unit="s", minv=0),
    panel(10, "Trainer samples/s", [("rate(dmrstream_trainer_samples_total[1m])", "learned"),
                                    ("rate(dmrstream_trainer_repeated_samples_total[1m])", "repeats dropped")],
          16, 26, 8, 8, unit="ops", minv=0),
    panel(11, "Model version timeline", [("max by (component) (dmrstream_model_version)", "{{component}}")],
          0, 34, 8, 8, draw="line", description="Published (trainer) and serving (scorer) version."),
    panel(12, "Swaps and publishes", [
        ("sum by (kind) (increase(dmrstream_scorer_swaps_total[1m]))", "swaps {{kind}}"),
        ("sum by (kind) (increase(dmrstream_publish_seconds_count[1m]))", "published {{kind}}"),
        ("increase(dmrstream_scorer_rollbacks_total[1m])", "automatic rollbacks"),
    ], 8, 34, 8, 8, minv=0, draw="bars"),
    panel(13, "Scorer latency", [(q(0.5), "p50 request"), (q(0.99), "p99 request"),
                                 (q(0.99, "during_swap"), "p99 during a swap")], 16, 34, 8, 8, unit="s", minv=0),
]


def dashboard() -> dict:
    return {"uid": "dmrstream", "title": "dmrstream", "tags": ["dmrstream"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "5s",
            "time": {"from": "now-30m", "to": "now"}, "panels": PANELS,
            "annotations": {"list": [{"name": "model versions", "datasource": DS, "enable": True,
                                      "iconColor": "rgba(255, 183, 77, 1)",
                                      "expr": "changes(max(dmrstream_model_version{component=\"scorer\"})[1m:])"
                                              " > 0", "step": "30s", "titleFormat": "model swap"}]},
            "templating": {"list": []}}


if __name__ == "__main__":
    out = Path(__file__).with_name("dashboards") / "dmrstream.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)
