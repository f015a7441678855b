"""The send loop shared by ``replay`` and ``simulate``: encode, key by user, pace, count."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from dmrstream.contracts import Click, encode
from replay.pacing import Pacer
from replay.records import BadRows, Event, Record
from replay.sinks import Sink


@dataclass
class Summary:
    events: int = 0
    impressions: int = 0
    clicks: int = 0  # every behaviour (click, cart, fav, buy)
    sampled: int = 0  # sampled negative impressions (part of ``impressions``)
    bytes: int = 0
    elapsed_s: float = 0.0
    first_ts: int | None = None
    last_ts: int | None = None
    delivery_failures: int = 0
    interrupted: bool = False  # stopped by Ctrl-C (what was queued is still flushed)
    bad: BadRows = field(default_factory=BadRows)

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0


def flatten(records: Iterable[Record]) -> Iterator[Event]:
    """The events of time-ordered records, in order."""
    for rec in records:
        yield from rec.events


def run(events: Iterable[Event], sink: Sink, pacer: Pacer | None = None, limit: int | None = None,
        bad: BadRows | None = None, progress: Callable[[Summary], None] | None = None,
        progress_every: int = 4096) -> Summary:
    """Send ``events`` to ``sink`` in order and close it. ``limit`` caps the number of events;
    ``progress`` is called every ``progress_every`` events and at the end. The summary counts
    what was handed to the sink minus nothing: ``delivery_failures`` says how many did not land."""
    s = Summary(bad=bad or BadRows())
    pacer = pacer if pacer is not None and pacer.active else None
    send = sink.send
    idle = getattr(sink, "idle", None)
    n = imps = clicks = sampled = nbytes = 0
    last_ts = None
    t0 = time.perf_counter()
    try:
        for ev in events:
            if limit is not None and n >= limit:
                break
            if pacer is not None:
                pacer.wait(ev.ts, n, idle)
            raw = encode(ev)
            if type(ev) is Click:
                send("clicks", str(ev.user_id).encode(), raw)
                clicks += 1
            else:
                send("impressions", str(ev.user_id).encode(), raw)
                imps += 1
                sampled += ev.sampled
            nbytes += len(raw)
            n += 1
            last_ts = ev.ts
            if s.first_ts is None:
                s.first_ts = ev.ts
            if progress is not None and n % progress_every == 0:
                s.events, s.last_ts, s.elapsed_s = n, last_ts, time.perf_counter() - t0
                progress(s)
    except KeyboardInterrupt:
        s.interrupted = True
    finally:
        s.delivery_failures = sink.close()
        s.events, s.impressions, s.clicks, s.sampled, s.bytes = n, imps, clicks, sampled, nbytes
        s.last_ts, s.elapsed_s = last_ts, time.perf_counter() - t0
        if progress is not None:
            progress(s)
    return s
