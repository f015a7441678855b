"""The label join alone (``streamer.join.LabelJoin``, pure logic, no I/O): events/s, and what
clicks held before their impressions cost.

A click whose impression has not been read yet is held until the watermark passes it; clicks with
no impression at all (organic clicks, an impression log that lost some) are held that long too,
and ``join.allowed_lateness_ms`` lengthens it. Every arriving impression looks among the held
clicks for its own. Runs the same stream (an impression every 5 ms of event time, 30 % clicked
1-20 s later, plus orphan clicks) with no lateness and with 60 s of it, in one process; the ratio
shows whether the held clicks slow impressions down (they did: each impression scanned every held
click, of every user, until session 11 indexed them by (user, item)). Also the join's Python
memory per waiting and per finished impression (tracemalloc). Run: ``python bench/join.py``.
"""

from __future__ import annotations

import json
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dmrstream.contracts import Impression, encode  # noqa: E402
from streamer.join import LabelJoin  # noqa: E402

T0 = 1_700_000_000_000
IMPRESSIONS, USERS, ORPHAN_SHARE = 60_000, 5_000, 0.2


def make_stream(seed: int = 1) -> list:
    """Events in event-time order (what the merge releases): ("i"|"c", id, user, item, ts, request)."""
    rng = random.Random(seed)
    out = []
    for k in range(IMPRESSIONS):
        user, item, ts = f"u{rng.randrange(USERS)}", f"i{int(rng.paretovariate(1.2)) % 20_000}", T0 + 5 * k
        out.append(("i", f"i{k}", user, item, ts, f"r{k}"))
        if rng.random() < 0.3:
            out.append(("c", f"c{k}", user, item, ts + rng.randrange(1_000, 20_000), f"r{k}"))
        if rng.random() < ORPHAN_SHARE:  # a click no impression will ever claim
            out.append(("c", f"o{k}", user, f"x{k}", ts, None))
    out.sort(key=lambda e: e[4])
    return out


def run(stream: list, lateness_ms: int) -> tuple[float, int, int]:
    """Events/s through one join, the most clicks it held at once, and the labels it gave."""
    j = LabelJoin(30_000, lateness_ms)
    held = labels = 0
    t = time.perf_counter()
    for n, (kind, eid, user, item, ts, req) in enumerate(stream):
        if kind == "i":
            out = j.on_impression(eid, user, item, ts, req, b"raw")
        else:
            out = j.on_click(eid, user, item, ts, req)
        labels += sum(1 for o in out if o.kind in ("positive", "negative"))
        if n % 1024 == 0:
            j.drain_changes()
            held = max(held, len(j.early))
    end = stream[-1][4] + 10**9  # both inputs far ahead: every impression gets its label
    for out in (j.on_impression("end", "end", "end", end, None, b"raw"), j.on_click("end-c", "end", "x", end, None)):
        labels += sum(1 for o in out if o.kind in ("positive", "negative"))
    took = time.perf_counter() - t
    return len(stream) / took, held, labels


def memory_per_impression(n: int = 20_000) -> tuple[float, float]:
    """Python bytes the join holds per waiting impression and per finished one (kept 2 W for
    late clicks and redelivery), with a real impression message and the counters it carries,
    users and items as in the stream."""
    stream = [e for e in make_stream(2) if e[0] == "i"][:n]  # its users and items
    raws = [encode(Impression(event_id=eid, user_id=int(user[1:]), item_id=int(item[1:]), category_id=0,
                              ts=T0 + k, request_id=req)) for k, (_, eid, user, item, _, req) in enumerate(stream)]
    extra = b"\x84" + b"\xa1x\xcb" + bytes(8) * 4  # ~4 msgpack floats, as the streamer freezes
    tracemalloc.start()
    j = LabelJoin(10 * n)
    w = 10 * n  # no click seen yet: no watermark, every impression waits
    base = tracemalloc.get_traced_memory()[0]
    for k, ((_, eid, user, item, _, req), raw) in enumerate(zip(stream, raws)):
        # ids made here, as decoding each message makes them: counted, not shared with ``stream``
        j.on_impression(eid.encode().decode(), int(user[1:]), int(item[1:]), T0 + k, req.encode().decode(),
                        raw, extra=extra)
    j.drain_changes()
    pending = (tracemalloc.get_traced_memory()[0] - base) / n
    end = T0 + n + w  # every impression past its window, none yet past its 2 W
    j.on_impression("end", "end", "end", end, None, b"raw")
    j.on_click("end-c", "end", "x", end, None)
    j.drain_changes()
    done = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    assert len(j.done) == n, len(j.done)
    return pending, done


def main() -> None:
    stream = make_stream()
    base_eps, base_held, base_labels = max((run(stream, 0) for _ in range(2)), key=lambda r: r[0])
    late_eps, late_held, late_labels = max((run(stream, 60_000) for _ in range(2)), key=lambda r: r[0])
    pending_b, done_b = memory_per_impression()
    figures = {
        "join_events_per_s": round(base_eps),
        "join_lateness60s_events_per_s": round(late_eps),
        "lateness60s_vs_none_ratio": round(late_eps / base_eps, 3),
        "early_clicks_held_max": base_held,
        "early_clicks_held_max_lateness60s": late_held,
        "events": len(stream),
        "bytes_per_waiting_impression": round(pending_b),
        "bytes_per_finished_impression": round(done_b),
    }
    table = Table("figure", "value", title=f"label join alone: {len(stream):,} events, {USERS:,} users, "
                                            f"{ORPHAN_SHARE:.0%} orphan clicks (best of 2)")
    table.add_row("events/s, no allowed lateness", f"{base_eps:,.0f}")
    table.add_row("  clicks held before an impression (most at once)", f"{base_held:,}")
    table.add_row("events/s, 60 s allowed lateness", f"{late_eps:,.0f}")
    table.add_row("  clicks held before an impression (most at once)", f"{late_held:,}")
    table.add_row("60 s lateness / none", f"{late_eps / base_eps:.2f}")
    table.add_row("labels given (each run)", f"{base_labels:,} / {late_labels:,}")
    table.add_row("Python memory per waiting impression (bytes)", f"{pending_b:,.0f}")
    table.add_row("  per finished impression, kept 2 W (bytes)", f"{done_b:,.0f}")
    Console().print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
