"""Pure feature-store logic: point-in-time counters, the record encoding, id keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from featurestore import codec, logic


def brute(times: list[int], as_of: int | None) -> int:
    return sum(1 for t in times if as_of is None or t < as_of)


@given(st.lists(st.integers(0, 40), max_size=60), st.integers(1, 8), st.data())
@settings(max_examples=300, deadline=None)
def test_counter_as_of_is_exact_from_its_oldest_kept_time(times, points, data):
    c = logic.empty_counter()
    for t in times:
        logic.counter_add(c, t, points)
    assert c[0] == len(times)
    assert len(c) <= 1 + 2 * points
    kept = c[1::2]
    assert kept == sorted(set(kept))
    as_of = data.draw(st.integers(-1, 45))
    if not kept or as_of >= kept[0] or len(set(times)) <= points:
        assert logic.counter_as_of(c, as_of) == brute(times, as_of)
    assert logic.counter_as_of(c, None) == len(times)
    asked = data.draw(st.lists(st.integers(-1, 45), max_size=10))
    assert logic.counter_as_of_each(c, asked) == [float(logic.counter_as_of(c, t)) for t in asked]


def test_counter_in_order_same_timestamp_excludes_siblings():
    c = logic.empty_counter()
    for t in (10, 20, 20, 20):
        logic.counter_add(c, t, 1)  # R=1 is the classic (total, last_ts, count_at_last_ts)
    assert logic.counter_as_of(c, 20) == 1  # an impression at 20 never sees its siblings
    assert logic.counter_as_of(c, 21) == 4
    # Documented approximation: older than the kept time, the count before it is returned.
    assert logic.counter_as_of(c, 5) == 1


def test_records_round_trip_with_version_byte_and_header():
    user = codec.UserRecord(items=[1, "a"], cats=[2, "b"], behaviors=bytes([1, 4]),
                            ts=(5).to_bytes(8, "little") * 2, profile={"age": 3})
    raw = codec.encode(user, 1234)
    assert raw[0] == codec.FORMAT_VERSION
    assert codec.last_active(raw) == 1234
    assert codec.decode(codec.UserRecord, raw) == user
    with pytest.raises(codec.FormatError):
        codec.decode(codec.UserRecord, b"\x09" + raw[1:])
    with pytest.raises(codec.FormatError):
        codec.decode(codec.UserRecord, raw[:-3])
    assert b"items" not in raw  # binary, array-like: no field names stored


@given(st.one_of(st.integers(0, (1 << 63) - 1), st.text(min_size=1, max_size=20)))
def test_id_keys_round_trip_and_keep_int_and_str_apart(value):
    assert codec.id_from_bytes(codec.id_bytes(value)) == value
    assert codec.id_bytes(1) != codec.id_bytes("1")


def test_offset_keys_round_trip_with_nul_bytes_in_partition():
    key = codec.offset_key("dmrstream.clicks", 256)
    assert codec.offset_from_key(key) == ("dmrstream.clicks", 256)


def test_event_hash_is_stable_across_processes():
    # A constant: Python's salted hash() would differ from run to run.
    assert codec.event_hash("e-1") == 0x9F0DF14B49867331


def test_contains_hash_only_matches_aligned_entries():
    blob = (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    assert logic.contains_hash(blob, (2).to_bytes(8, "little"))
    assert not logic.contains_hash(blob, blob[3:11])  # present as bytes, but straddles two entries
    assert not logic.contains_hash(blob, (3).to_bytes(8, "little"))


@given(st.lists(st.integers(0, 40), max_size=30), st.lists(st.integers(0, 60), min_size=1, max_size=30),
       st.integers(1, 8))
@settings(max_examples=300, deadline=None)
def test_counter_extend_equals_repeated_counter_add(before, times, points):
    a, b = logic.empty_counter(), logic.empty_counter()
    for t in before:
        logic.counter_add(a, t, points)
        logic.counter_add(b, t, points)
    times.sort()
    for t in times:
        logic.counter_add(a, t, points)
    logic.counter_extend(b, times, points)
    assert a == b


def test_accept_impressions_drops_repeats_and_forgotten_ids_and_trims_the_fifo():
    from dmrstream.contracts import Impression

    def imp(eid, ts):
        return Impression(event_id=eid, user_id=1, item_id=2, category_id=3, ts=ts)

    dd, out = codec.DedupeRecord(), logic.Outcome()
    first = logic.accept_impressions(dd, [imp("a", 10), imp("b", 11), imp("a", 12)], 2, out)
    assert [e.event_id for e in first] == ["a", "b"] and out.duplicates == 1  # repeat inside the batch
    assert dd.imp_hashes == codec.event_hash_packed("a") + codec.event_hash_packed("b")
    assert codec.event_hash_packed("a") == codec.event_hash("a").to_bytes(8, "little")  # the stored form
    again = logic.accept_impressions(dd, [imp("b", 11), imp("c", 13)], 2, out)
    assert [e.event_id for e in again] == ["c"] and out.duplicates == 2  # repeat of a stored id
    # The FIFO keeps 2 ids: "a" (ts 10) was forgotten, raising the floor to 10, so a replay of it
    # at or below that floor is dropped as too old, never counted twice.
    assert dd.imp_floor_ts == 10 and len(dd.imp_hashes) == 16
    assert logic.accept_impressions(dd, [imp("a", 10)], 2, out) == [] and out.too_old == 1
