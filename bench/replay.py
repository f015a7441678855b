"""Replay and simulate benchmark (not a test): events/s and MB/s into the local broker at
``--speed max``, and of the simulator writing a JSON-lines file.

    .venv/bin/python bench/replay.py

Workloads (each timed from the first parsed row to the last acknowledged delivery, so parsing,
sorting, encoding, batching, lz4 and acks=all are all inside the figure):
- MovieLens 100K (``../shared/data/ml-100k``, skipped when absent) into Kafka with the default
  client (aiokafka's C batch builder) and with kafka-python's ``make_producer`` for comparison;
- a simulated JSON-lines file (300k events, written first) replayed into Kafka;
- simulate 1M events to a file; simulate 300k events into Kafka.
MB/s counts the JSON payloads (before compression). The machine has 2 cores shared with other
engineers' work and the broker runs on the same cores: figures are noisy; run twice to compare.
Targets (issue 6): replay into Kafka >= 30,000 events/s; simulate to a file >= 200,000 events/s.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmrstream.broker import LocalBroker  # noqa: E402
from dmrstream.kafkaio import create_topics  # noqa: E402
from dmrstream.settings import load_settings  # noqa: E402
from replay.records import BadRows  # noqa: E402
from replay.runner import Summary, flatten, run  # noqa: E402
from replay.simulate import SimConfig, simulate  # noqa: E402
from replay.sinks import JsonlSink, kafka_sink  # noqa: E402
from replay.sources import ReplayOptions, open_sources  # noqa: E402

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
SIM = SimConfig(seed=1)


def replay_into(paths: list[Path], sink) -> Summary:
    bad = BadRows()
    records, _ = open_sources(paths, ReplayOptions(), bad, load_settings().limits)
    return run(flatten(records), sink, bad=bad)


def main() -> None:
    console = Console()
    rows: list[tuple[str, Summary]] = []
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        settings = load_settings(overrides={"kafka.bootstrap_servers": broker.bootstrap,
                                            "topics.prefix": f"bench{uuid.uuid4().hex[:6]}."})
        create_topics(settings)
        sim_file = Path(tmp) / "sim.jsonl"

        rows.append(("simulate -> file (1M events)", run(simulate(SIM, 1_000_000), JsonlSink(Path(tmp) / "big.jsonl"))))
        run(simulate(SIM, 300_000), JsonlSink(sim_file))
        if MOVIELENS.is_dir():
            rows.append(("replay MovieLens 100K -> Kafka (aiokafka)", replay_into([MOVIELENS], kafka_sink(settings))))
            rows.append(("replay MovieLens 100K -> Kafka (kafka-python)",
                         replay_into([MOVIELENS], kafka_sink(settings, "kafka-python"))))
        else:
            console.print("[yellow]../shared/data/ml-100k absent: MovieLens rows skipped[/]")
        rows.append(("replay simulated file (300k) -> Kafka (aiokafka)", replay_into([sim_file], kafka_sink(settings))))
        rows.append(("simulate -> Kafka (300k, aiokafka)", run(simulate(SIM, 300_000), kafka_sink(settings))))

    table = Table(title="replay / simulate at --speed max (2 shared cores: noisy)")
    for col in ("workload", "events", "seconds", "events/s", "MB/s", "failed"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for name, s in rows:
        table.add_row(name, f"{s.events:,}", f"{s.elapsed_s:.2f}", f"{s.events_per_s:,.0f}", f"{s.mb_per_s:.1f}",
                      str(s.delivery_failures))
    console.print(table)

    keys = {"simulate -> file": "simulate_file", "MovieLens 100K -> Kafka (aiokafka)": "replay_movielens_kafka",
            "MovieLens 100K -> Kafka (kafka-python)": "replay_movielens_kafka_python",
            "simulated file (300k) -> Kafka": "replay_simfile_kafka", "simulate -> Kafka": "simulate_kafka"}
    figures: dict[str, float] = {}
    for name, s in rows:
        key = next(v for k, v in keys.items() if k in name)
        figures[f"{key}_events_per_s"] = round(s.events_per_s)
        figures[f"{key}_mb_per_s"] = round(s.mb_per_s, 2)
        figures[f"{key}_delivery_failures"] = s.delivery_failures
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
