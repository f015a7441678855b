"""glibc malloc settings for processes that run PyTorch on large batches (trainer, scorer).

glibc serves allocations above a (dynamic, <= 32 MB) threshold with fresh ``mmap`` pages and
gives freed heap top back to the kernel above 128 KB: a forward pass over (200, 50, 80) float
tensors then page-faults every one of its multi-MB temporaries, every pass. bench/scorer.py run
with and without it (2-core machine): 22,374 vs 20,077 candidates/s/core, the gathered forward
10.8 vs 12.9 ms (before the group-by-group forward, a one-off run gave 11-12 vs 21-24 ms).
The cost: freed memory stays in the process (up to ``trim_mb``) for reuse instead of going back
to the kernel. ``DMRSTREAM_MALLOC_TUNING=0`` leaves glibc's defaults (to compare: bench/scorer.py
run both ways).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done: list[bool] = []


def tune_allocator(mmap_mb: int = 256, trim_mb: int = 1024) -> bool:
    """Serve allocations up to ``mmap_mb`` from the heap and keep up to ``trim_mb`` of freed heap
    for reuse. Idempotent; True when glibc accepted both (False elsewhere, e.g. musl, macOS)."""
    if _done:
        return _done[0]
    ok = False
    if os.environ.get("DMRSTREAM_MALLOC_TUNING", "1") == "0":
        _done.append(ok)
        return ok
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:
            ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_mb << 20))
    except OSError:
        ok = False
    if not ok:
        log.debug("malloc tuning not available on this platform")
    _done.append(ok)
    return ok
