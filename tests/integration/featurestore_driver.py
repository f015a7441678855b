"""Child process of the feature-store crash test: applies a deterministic event log in batches,
resuming from the store's committed offset, until killed (or done).

Usage: python featurestore_driver.py STORE_DIR SEED N_EVENTS BATCH
Prints "ready <offset>" once the store is open, "done" at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from featurestore import PartitionStore  # noqa: E402
from featurestore_log import event_log  # noqa: E402

TOPIC = ("log", 0)


def main() -> None:
    path, seed, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    log = event_log(seed, n)
    store = PartitionStore(path)
    offset = store.committed_offsets().get(TOPIC, 0)
    print(f"ready {offset}", flush=True)
    while offset < len(log):
        end = min(offset + batch, len(log))
        # The applied-count under the caller's prefix rides in the same batch as the offset.
        store.apply(log[offset:end], offsets={TOPIC: end}, extra_changes={b"test/applied": str(end).encode()})
        offset = end
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
