"""Crash safety: a child process applying batches is SIGKILLed at random moments; after every
restart the store holds exactly the batches its committed offset says (never half a batch), and
at the end the whole log, re-applied, gives exactly the reference sequences and counters."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featurestore import PartitionStore
from featurestore_log import event_log, reference_counters, reference_sequences, store_sequences

DRIVER = Path(__file__).with_name("featurestore_driver.py")
SEED, N_EVENTS, BATCH, KILLS = 7, 120_000, 1_000, 22  # long enough for 20+ kills on a fast machine
TOPIC = ("log", 0)
KEEP = 64  # seq_len 50 + seq_keep_extra 14 (defaults)


def _spawn(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), str(path), str(SEED), str(N_EVENTS), str(BATCH)],
                            stdout=subprocess.PIPE, text=True, cwd=DRIVER.parents[2])


def _check_consistent(path: Path, log: list) -> int:
    """The state equals the reference over exactly the first ``offset`` messages."""
    with PartitionStore(path) as store:
        offset = store.committed_offsets().get(TOPIC, 0)
        applied = store.get_extra(b"test/applied")
        assert int(applied or b"0") == offset, "caller state and offsets come from different batches"
        prefix = log[:offset]
        ref = reference_sequences(prefix, KEEP)
        users = {e.user_id for e in log}
        got = store_sequences(store, users, KEEP)
        assert got == {u: ref.get(u, []) for u in users}
        # Counters of a few users/items: a half-applied batch would show in them too.
        for e in log[offset - 1:offset - 400:-37] if offset else ():
            assert store.counters_as_of(e.user_id, e.item_id, None) == reference_counters(prefix, e.user_id, e.item_id)
        return offset


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_never_leaves_half_a_batch(tmp_path):
    rng = random.Random(1)
    log = event_log(SEED, N_EVENTS)
    path = tmp_path / "p0"
    offsets, kills = [], 0
    while kills < KILLS:
        child = _spawn(path)
        line = child.stdout.readline()
        assert line.startswith("ready"), line
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        kills += 1
        offsets.append(_check_consistent(path, log))
        if offsets[-1] >= len(log):
            break
    print("offsets after kills:", offsets)
    assert kills >= 20, f"the log ran out after {kills} kills; make it longer"
    assert offsets == sorted(offsets)
    # Partial progress between kills shows the kills landed mid-log, not before any batch.
    assert len(set(offsets)) > KILLS // 2, offsets

    child = _spawn(path)  # finish the log
    out, _ = child.communicate(timeout=60)
    assert "done" in out and child.returncode == 0
    assert _check_consistent(path, log) == len(log)

    # Re-applying the whole log changes nothing, and equals the plain reference.
    ref = reference_sequences(log, KEEP)
    with PartitionStore(path) as store:
        result = store.rebuild_from(log)
        assert result["behaviours"] == result["impressions"] == 0
        assert store_sequences(store, ref, KEEP) == ref
    # So does rebuilding a fresh partition from the event log.
    with PartitionStore(tmp_path / "rebuilt") as fresh:
        fresh.rebuild_from(log, batch_size=777)
        assert store_sequences(fresh, ref, KEEP) == ref
