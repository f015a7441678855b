"""Build training samples from a labelled impression (pure)."""

from __future__ import annotations

from typing import Any, Sequence

from dmrstream.contracts import Impression, Sample


def sample_id_of(impression_id: str, correction: bool = False) -> str:
    """Deterministic sample id: redelivery re-creates the same id, so the trainer can drop repeats."""
    return f"{impression_id}#corr" if correction else impression_id


def build_sample(imp: Impression, label: int, history: Sequence[tuple[Any, Any, str, int]],
                 counters: dict[str, float] | None, *, correction: bool = False,
                 served_score: float | None = None, served_version: int | None = None) -> Sample:
    """A sample for ``imp`` with its label, the behaviours strictly before it (oldest first:
    (item id, category id, behaviour, ts)) and its point-in-time counters."""
    hist = [h for h in history if h[3] < imp.ts]  # never the impression's own click, nor later ones
    columns = ([h[0] for h in hist], [h[1] for h in hist], [h[2] for h in hist], [h[3] for h in hist])
    return sample_of_columns(imp, label, columns, counters, correction=correction, served_score=served_score,
                             served_version=served_version)


def sample_of_columns(imp: Impression, label: int, columns: tuple[list, list, list, list],
                      counters: dict[str, float] | None, *, correction: bool = False,
                      served_score: float | None = None, served_version: int | None = None) -> Sample:
    """:func:`build_sample` from the history as columns ``(item ids, category ids, behaviours,
    timestamps)``, oldest first, already strictly before the impression (what
    ``PartitionStore.histories_many`` returns): no per-behaviour tuples."""
    items, cats, behaviors, ts = columns
    if ts and ts[-1] >= imp.ts:  # a caller's bug, never the store's: the sample would leak its label
        raise ValueError("history holds a behaviour not strictly before the impression")
    return Sample(
        sample_id=sample_id_of(imp.event_id, correction), event_id=imp.event_id, user_id=imp.user_id,
        item_id=imp.item_id, category_id=imp.category_id, ts=imp.ts, label=label,
        hist_item_ids=items, hist_category_ids=cats, hist_behaviors=behaviors, hist_ts=ts,
        position=imp.position, context=imp.context, user_profile=imp.user_profile,
        item_features=imp.item_features, counters=counters, served_score=served_score,
        served_version=served_version, correction=correction, sampled=imp.sampled, true_ctr=imp.true_ctr,
    )
