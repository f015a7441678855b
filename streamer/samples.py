"""Build training samples from a labelled impression (pure)."""

from __future__ import annotations

from typing import Any

import msgspec

from dmrstream.contracts import SCHEMA_VERSION, Impression, Sample


def sample_id_of(impression_id: str, correction: bool = False) -> str:
    """Deterministic sample id: redelivery re-creates the same id, so the trainer can drop repeats."""
    return f"{impression_id}#corr" if correction else impression_id


# Sample's fields in Sample's order, as a positional struct that validates nothing: it encodes to
# the same JSON as Sample and is built ~5x faster (msgspec matches a kw_only struct's keyword
# arguments one by one: 2.4 vs 0.5 us a sample here, ~3 % of the streamer's processing). What
# goes in passed the codec's checks or comes from the feature store. tests/unit/test_samples.py
# holds the two encodings equal.
SampleRow = msgspec.defstruct("SampleRow", [(name, Any) for name in Sample.__struct_fields__])
_encode = msgspec.json.Encoder().encode


def encoded_sample(imp: Impression, label: int, columns: tuple[list, list, list, list],
                   counters: dict[str, float] | None, *, correction: bool = False) -> bytes:
    """The JSON of the :class:`Sample` for ``imp`` with its label, its point-in-time counters and
    its history as columns ``(item ids, category ids, behaviours, timestamps)``, oldest first,
    strictly before the impression (what ``PartitionStore.histories_many`` returns)."""
    items, cats, behaviors, ts = columns
    if ts and ts[-1] >= imp.ts:  # a caller's bug, never the store's: the sample would leak its label
        raise ValueError("history holds a behaviour not strictly before the impression")
    eid = imp.event_id
    return _encode(SampleRow(
        SCHEMA_VERSION, sample_id_of(eid, correction), eid, imp.user_id, imp.item_id, imp.category_id,
        imp.ts, label, items, cats, behaviors, ts, imp.position, imp.context, imp.user_profile,
        imp.item_features, counters,
        None, None,  # served_score, served_version: the scorer's, not known here
        correction, imp.sampled, imp.true_ctr,
    ))
