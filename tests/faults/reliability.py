"""Write the figures of the last fault-injection run (``tests/faults/soak.py``) as a markdown
table to ``tests/faults/RELIABILITY.md``.

    python tests/faults/reliability.py [FIGURES.json] [--out PATH]

FIGURES.json defaults to the last run's (``$TMPDIR/dmrstream-soak-last.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from soak import KINDS, LAST_FIGURES  # noqa: E402


def _s(v) -> str:
    return "-" if v is None else f"{v:g} s"


def render(f: dict) -> str:
    c = f.get("config", {})
    ok = not f.get("problems")
    lines = [
        "## Reliability: fault injection on the whole pipeline",
        "",
        f"`tests/faults/soak.py` (seed {f['seed']}): the local broker, the streamer, the trainer and a scorer as "
        f"real processes, {f['stream_s']:g} s of simulated stream at {c.get('events_per_s', '?'):g} events/s and "
        f"{c.get('requests_per_s', '?'):g} score requests/s, {c.get('partitions', '?')} partitions, "
        f"{c.get('attribution_window_ms', 0) / 1000:g} s attribution window; SIGKILL + restart of the streamer, the "
        "trainer and the scorer, and broker restarts, at seeded random moments. Recovery: from the restart to the "
        "component's next progress (samples produced / learned, requests answered; broker: all three). "
        f"Run took {f.get('wall_s', 0):g} s; result: **{'pass' if ok else 'FAIL'}**.",
        "",
        "| fault | injected | recovery p50 | recovery max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k in KINDS:
        r = f["recovery_s"].get(k, {})
        lines.append(f"| {k} {'restart' if k == 'broker' else 'SIGKILL'} | {f['faults'].get(k, 0)} | "
                     f"{_s(r.get('p50'))} | {_s(r.get('max'))} |")
    b = f.get("broker_recovery_by_component_s", {})
    if b:
        lines.append("")
        lines.append("After a broker restart, per component (p50 / max): " + ", ".join(
            f"{k} {_s(v.get('p50'))} / {_s(v.get('max'))}" for k, v in b.items()) + ".")
    lines += [
        "",
        "| check | value |",
        "| --- | ---: |",
        f"| events produced (impressions / clicks) | {f['events_produced']:,} ({f['impressions']:,} / {f['clicks']:,}) |",
        f"| impressions with a closed window, checked for exactly one sample id | {f['impressions_settled_checked']:,} |",
        f"| sample ids / sample messages on the topic (repeats allowed, same label) | {f['sample_ids']:,} / "
        f"{f['sample_messages']:,} |",
        f"| samples learned by the trainer (each once) | {f['samples_learned']:,} |",
        f"| score requests / answers (repeats) | {f['score_requests']:,} / {f['score_answers']:,} "
        f"({f['score_answer_repeats']}) |",
        f"| users whose feature-store sequence equals the reference | {f['users_checked_in_store'] - f['store_mismatches']:,}"
        f" of {f['users_checked_in_store']:,} |",
        f"| **messages lost** | **{f['messages_lost']}** |",
        f"| **duplicates after dedupe** (label conflicts, samples learned twice) | **{f['duplicates_after_dedupe']}** |",
        f"| components that died by themselves / stayed stuck | {len(f['unexpected_exits'])} / {len(f['not_recovered'])} |",
        f"| exit codes on SIGTERM | {', '.join(f'{k} {v}' for k, v in f['exit_codes_on_sigterm'].items())} |",
        "",
        "A broker restart here is a restart of the local tansu broker, whose only usable storage is memory "
        "(`s3://` needs an S3 service, `postgres://` is not built in): the new broker is an empty cluster at the same "
        "address, topics re-created by `dmrstream broker`. The driver therefore drains the pipeline before the kill "
        "(drain times: " + ", ".join(f"{d['seconds']:g} s" for d in f.get("drains_before_broker_restart", [])) +
        "); what it tests is that every component reconnects by itself, with back-off, and goes on with the new "
        "cluster. Messages inside a memory broker when it dies are lost with it; Apache Kafka keeps them.",
    ]
    if f.get("problems"):
        lines += ["", "Problems: " + "; ".join(f["problems"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("figures", nargs="?", type=Path, default=LAST_FIGURES)
    ap.add_argument("--out", type=Path, default=HERE / "RELIABILITY.md")
    a = ap.parse_args(argv)
    f = json.loads(a.figures.read_text())
    a.out.write_text(render(f))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
