"""Pacing: how long to wait before sending the next event. Pure arithmetic plus a thin sleeper.

``speed`` replays event time ``speed`` times faster than it happened (``--speed 60``: an hour of
log in a minute); ``rate`` caps events per second. Both may apply (the slower one wins). With
neither, events go as fast as the sink takes them (``--speed max``).
"""

from __future__ import annotations

import time
from typing import Callable


def parse_speed(text: str | None) -> float | None:
    """``"max"``/``None`` -> None (no pacing), ``"60"``/``"60x"`` -> 60.0."""
    if text is None or text.strip().lower() in ("max", "inf", ""):
        return None
    value = float(text.strip().lower().rstrip("x"))
    if not value > 0:
        raise ValueError(f"speed must be > 0 or 'max', got {text!r}")
    return value


class Pacer:
    """Anchored at the first event: the n-th event with time ``ts`` is due at
    ``start + max((ts - ts0) / 1000 / speed, n / rate)`` on the monotonic clock."""

    def __init__(self, speed: float | None = None, rate: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.speed, self.rate = speed, rate
        self.clock, self.sleep = clock, sleep
        self.start: float | None = None
        self.ts0 = 0

    @property
    def active(self) -> bool:
        return self.speed is not None or self.rate is not None

    def due(self, ts_ms: int, n_sent: int) -> float:
        """Seconds after the start at which the event (``n_sent`` events already sent) is due."""
        t = 0.0
        if self.speed is not None:
            t = max(t, (ts_ms - self.ts0) / 1000.0 / self.speed)
        if self.rate is not None:
            t = max(t, n_sent / self.rate)
        return t

    def delay(self, ts_ms: int, n_sent: int) -> float:
        """Seconds to wait now before sending this event (0 when late or unpaced)."""
        if not self.active:
            return 0.0
        now = self.clock()
        if self.start is None:
            self.start, self.ts0 = now, ts_ms
        return max(0.0, self.start + self.due(ts_ms, n_sent) - now)

    def wait(self, ts_ms: int, n_sent: int, before_sleep: Callable[[float], None] | None = None) -> float:
        """Sleep until the event is due; returns the time slept. Waits under 1 ms are skipped
        (they accumulate into the next one), so pacing costs one clock read per event.
        ``before_sleep(seconds)`` runs first (the sink pushes out what it buffers)."""
        d = self.delay(ts_ms, n_sent)
        if d >= 0.001:
            if before_sleep is not None:
                before_sleep(d)
            self.sleep(d)
            return d
        return 0.0
