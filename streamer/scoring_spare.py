"""The spare replica: the version a swap replaced, kept so the next delta is written into it in
place instead of copying every table.

Applying a delta to a copy of the live state clones each table it touches (the default shape:
~420 MB of tables per delta, every P seconds), and that copy competes with serving for memory
bandwidth and page faults. Two replicas take turns instead: the replaced version becomes the
spare; the next delta first replays onto it what it missed (the delta that made the live version,
or the whole live state after a full load), then its own rows, once no forward pass reads it any
more. A delta then costs a few MB of writes, the same bits as the copy (tests compare).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from streamer.scoring_load import Loaded
from trainer.modelstore import write_delta

log = logging.getLogger(__name__)


def _storages(state: dict[str, torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in state.values()}


class SpareReplica:
    """One spare version's tensors and what they lack to equal the live version."""

    def __init__(self) -> None:
        self.loaded: Loaded | None = None
        self.live_version: int | None = None  # the live version the spare trails
        self.behind: list[dict[str, torch.Tensor]] | None = None  # deltas spare -> live; None: copy it whole

    def keep(self, old: Loaded | None, new: Loaded) -> None:
        """``new`` just replaced ``old``: keep ``old`` as the spare unless the two share a
        tensor (writing into it would change the live version). When ``new`` was made from
        ``old`` by a delta, that delta is what the spare lacks; else it is copied whole later."""
        if old is None or old is new or (_storages(old.state) & _storages(new.state)):
            self.drop()
            return
        from_old = new.delta is not None and new.update is not None and new.update.base_version == old.version
        self.loaded, self.live_version = old, new.version
        self.behind = [new.delta] if from_old else None

    def take(self, live: Loaded, holder: Any, wait_s: float = 5.0) -> Loaded | None:
        """The spare brought level with ``live`` (written in place), or None when there is no
        usable spare. Waits until no forward pass reads the spare (it was live until the last
        swap). The spare is handed over: it is no longer kept here."""
        spare, behind, trails = self.loaded, self.behind, self.live_version
        self.drop()
        if spare is None or trails != live.version:
            return None
        if not holder.wait_unread(spare, wait_s):
            log.warning("spare replica v%d still read after %.0fs: copying instead", spare.version, wait_s)
            return None
        with torch.no_grad():
            if behind is None:
                for name, t in spare.state.items():
                    t.copy_(live.state[name])
            else:
                for delta in behind:
                    write_delta(spare.state, delta)
        return spare

    def drop(self) -> None:
        self.loaded, self.live_version, self.behind = None, None, None
