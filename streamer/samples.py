"""Build training samples from a labelled impression (pure)."""

from __future__ import annotations

from dmrstream.contracts import Impression, Sample


def sample_id_of(impression_id: str, correction: bool = False) -> str:
    """Deterministic sample id: redelivery re-creates the same id, so the trainer can drop repeats."""
    return f"{impression_id}#corr" if correction else impression_id


def sample_of_columns(imp: Impression, label: int, columns: tuple[list, list, list, list],
                      counters: dict[str, float] | None, *, correction: bool = False) -> Sample:
    """A sample for ``imp`` with its label, its point-in-time counters and its history as
    columns ``(item ids, category ids, behaviours, timestamps)``, oldest first, strictly before
    the impression (what ``PartitionStore.histories_many`` returns)."""
    items, cats, behaviors, ts = columns
    if ts and ts[-1] >= imp.ts:  # a caller's bug, never the store's: the sample would leak its label
        raise ValueError("history holds a behaviour not strictly before the impression")
    return Sample(
        sample_id=sample_id_of(imp.event_id, correction), event_id=imp.event_id, user_id=imp.user_id,
        item_id=imp.item_id, category_id=imp.category_id, ts=imp.ts, label=label,
        hist_item_ids=items, hist_category_ids=cats, hist_behaviors=behaviors, hist_ts=ts,
        position=imp.position, context=imp.context, user_profile=imp.user_profile,
        item_features=imp.item_features, counters=counters, correction=correction, sampled=imp.sampled,
        true_ctr=imp.true_ctr,
    )
