"""The catalogue of every metric, defined once and shared by all components.

Metric objects live in the default prometheus-client registry; each process exposes them with
:func:`serve_metrics` on its configured port, bound to loopback unless configured otherwise.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

EVENTS_IN = Counter("dmrstream_events_in_total", "Messages consumed, by topic.", ["component", "topic"])
EVENTS_OUT = Counter("dmrstream_events_out_total", "Messages produced, by topic.", ["component", "topic"])
DEAD_LETTERS = Counter("dmrstream_dead_letters_total", "Messages rejected to dead-letters, by reason kind.",
                       ["component", "topic", "reason"])
JOIN_OUTCOMES = Counter("dmrstream_join_outcomes_total",
                        "Label-join results: positive, negative, late_click, correction, duplicate.", ["outcome"])
WATERMARK = Gauge("dmrstream_streamer_watermark_ms", "Event-time watermark of a partition (epoch ms).",
                  ["partition"])
PENDING = Gauge("dmrstream_streamer_pending_impressions", "Impressions waiting for their label.", ["partition"])
FINISHED = Gauge("dmrstream_streamer_finished_impressions",
                 "Labelled impressions remembered for late clicks and redelivery (late horizon, W by default).",
                 ["partition"])
EARLY_CLICKS = Gauge("dmrstream_streamer_early_clicks", "Clicks held for an impression not read yet.", ["partition"])
REORDER_BUFFERED = Gauge("dmrstream_streamer_reorder_buffered_events",
                         "Events waiting for the other input to reach their event time (merge into time order).",
                         ["partition"])
BATCH_SECONDS = Histogram("dmrstream_streamer_batch_seconds",
                          "Time to process one consumed batch (join, store, samples produced).",
                          buckets=_LATENCY_BUCKETS)
FEATURESTORE_SECONDS = Histogram("dmrstream_featurestore_seconds", "Feature-store operation latency.",
                                 ["op"], buckets=_LATENCY_BUCKETS)
FEATURESTORE_KEYS = Gauge("dmrstream_featurestore_keys", "Keys in a partition's store.", ["partition"])
FEATURESTORE_BYTES = Gauge("dmrstream_featurestore_bytes", "Bytes on disk of a partition's store.", ["partition"])

TRAINER_SAMPLES = Counter("dmrstream_trainer_samples_total", "Samples learned (repeats excluded).")
TRAINER_REPEATS = Counter("dmrstream_trainer_repeated_samples_total", "Samples dropped as repeats by id.")
TRAINER_SAMPLES_PER_S = Gauge("dmrstream_trainer_samples_per_second", "Learning rate since start, samples/s.")
TRAINER_LOSS = Gauge("dmrstream_trainer_loss", "Training loss of the last batch.")
TRAINER_QUALITY = Gauge("dmrstream_trainer_progressive", "Prequential metrics: auc_window, auc_cumulative "
                        "(exact, then from a score histogram: auc_cumulative_tie_bound), logloss_window, "
                        "ctr_predicted_window, ctr_actual_window, samples, logloss_cumulative, "
                        "ctr_predicted_cumulative, ctr_actual_cumulative, invalid_scores_cumulative.", ["metric"])
TRAINER_CHECKPOINTS = Counter("dmrstream_trainer_checkpoints_total", "Checkpoints written.")
CHECKPOINT_AGE = Gauge("dmrstream_trainer_checkpoint_age_seconds", "Seconds since the last checkpoint.")
PUBLISH_SECONDS = Histogram("dmrstream_publish_seconds", "Time to publish a model version.", ["kind"],
                            buckets=_LATENCY_BUCKETS)
PUBLISH_BYTES = Gauge("dmrstream_publish_bytes", "Size of the last published version file.", ["kind"])
MODEL_VERSION = Gauge("dmrstream_model_version", "Model version published (trainer) or serving (scorer).",
                      ["component"])


def reason_kind(reason: str) -> str:
    """Low-cardinality label from a dead-letter reason ("invalid: ..." -> "invalid")."""
    return reason.split(":", 1)[0][:32] or "unknown"


def serve_metrics(port: int, bind: str = "127.0.0.1") -> None:
    """Expose /metrics of this process (a daemon thread). Port 0 disables."""
    if port:
        start_http_server(port, addr=bind)


# -- scorers (streamer/scoring*.py) ---------------------------------------------------------------
SCORER_SECONDS = Histogram("dmrstream_scorer_seconds", "Scorer latency: request in to score out (request), "
                           "one forward pass (batch), a pass while a swap was under way (during_swap).",
                           ["stage"], buckets=_LATENCY_BUCKETS)
SCORER_REQUESTS = Counter("dmrstream_scorer_requests_total", "Requests scored, by source (request|impression).",
                          ["source"])
SCORER_CANDIDATES = Counter("dmrstream_scorer_candidates_total", "Candidates scored.")
SCORER_RESPONSES = Counter("dmrstream_scorer_responses_total", "Responses by outcome (ok|failed|dead_letter|duplicate).",
                           ["outcome"])
SCORER_SWAPS = Counter("dmrstream_scorer_swaps_total", "Model swaps by kind (full|delta|rollback).", ["kind"])
SCORER_LOAD_SECONDS = Histogram("dmrstream_scorer_load_seconds", "Load + validation of a version (off the "
                                "serving path).", ["kind"], buckets=_LATENCY_BUCKETS)
SCORER_REFUSALS = Counter("dmrstream_scorer_refusals_total", "Versions refused, by reason.", ["reason"])
SCORER_ROLLBACKS = Counter("dmrstream_scorer_rollbacks_total", "Automatic rollbacks on serving AUC.")
SERVING_AUC = Gauge("dmrstream_serving_auc", "Exact AUC of the scores served by a version, over its last "
                    "labelled samples.", ["version"])
SERVING_LABELLED = Gauge("dmrstream_serving_labelled", "Labelled samples in a version's serving AUC.", ["version"])
SCORER_FRESHNESS = Gauge("dmrstream_scorer_freshness_seconds", "Now minus the newest event time the serving "
                         "model has learned from.")


# -- monitoring (monitoring/lag.py, monitoring/dashboard.py) -------------------------------------
CONSUMER_LAG = Gauge("dmrstream_consumer_lag", "Messages not yet consumed: end offset minus the committed "
                     "offset of a consumer group, per topic and partition.", ["group", "topic", "partition"])
TOPIC_END_OFFSET = Gauge("dmrstream_topic_end_offset", "End offset (messages written) of a topic partition.",
                         ["topic", "partition"])
MODEL_FRESHNESS = Gauge("dmrstream_model_freshness_seconds", "Now minus the newest event time the latest "
                        "published model has learned from (model store; the scorer's own figure is "
                        "dmrstream_scorer_freshness_seconds).")
DASHBOARD_SCRAPES = Counter("dmrstream_dashboard_scrapes_total", "Scrapes of a component's /metrics by the "
                            "live page, by outcome (ok|error).", ["target", "outcome"])


def catalogue() -> list[dict[str, object]]:
    """Every metric of this catalogue: name (as exposed), type, labels, help; sorted by name."""
    from prometheus_client.metrics import MetricWrapperBase

    out = []
    for obj in globals().values():
        if isinstance(obj, MetricWrapperBase):
            name = obj._name + ("_total" if obj._type == "counter" else "")
            out.append({"name": name, "type": obj._type, "labels": list(obj._labelnames),
                        "help": obj._documentation})
    return sorted(out, key=lambda m: m["name"])
