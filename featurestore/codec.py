"""Key layout and the compact binary encoding of the feature store's records. Pure, no I/O.

Every value starts with a one-byte format version and an 8-byte big-endian "last active" event
time, then a msgpack body (msgspec, array-like structs: field names are not stored). The fixed
header lets the retention sweep read a record's age without decoding it.

Keys (one RocksDB per partition, so no partition in the key)::

    s/<id>   user record: behaviour sequence, counters, profile      (read path)
    d/<id>   user dedupe memory: event-id hashes                       (write path only)
    i/<id>   item record: side features and counters
    o/<topic>\\0<partition>   next offset to consume (8 bytes, signed big-endian)
    x/<caller key>            caller state written in the same batch (opaque bytes)
    m/<name>                  store metadata

Ids are ints or strings as given by the source: ``b"i" + 8-byte signed big-endian`` for ints,
``b"s" + UTF-8`` for strings, so ``1`` and ``"1"`` are different users, as in the events.
"""

from __future__ import annotations

import struct
from array import array
from hashlib import blake2b
from typing import Any, Union

import msgspec

FORMAT_VERSION = 2  # 2: packed seq_hashes
USER, DEDUPE, ITEM, OFFSET, EXTRA, META = b"s/", b"d/", b"i/", b"o/", b"x/", b"m/"

# Behaviour codes as in the Alimama reference layout (vocabulary 5, 0 = padding).
BEHAVIOR_CODES: dict[str, int] = {"click": 1, "cart": 2, "fav": 3, "buy": 4}
BEHAVIOR_NAMES: tuple[str, ...] = ("pad", "click", "cart", "fav", "buy")

Id = Union[int, str]
_HEADER = struct.Struct(">Bq")
HEADER_SIZE = _HEADER.size


class FormatError(ValueError):
    """A stored value this code cannot read (unknown version, truncated)."""


# -- ids and keys -----------------------------------------------------------------------------
def id_bytes(value: Id) -> bytes:
    """Type-tagged bytes of an id (ints and strings never collide)."""
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    return b"i" + int(value).to_bytes(8, "big", signed=True)


_INT_KEY = struct.Struct(">2scq")


def id_keys(prefix: bytes, values: list) -> list[bytes]:
    """``prefix + id_bytes(v)`` for many ids (a 2-byte prefix); ints packed in one C call each."""
    pack = _INT_KEY.pack
    try:
        return [pack(prefix, b"i", v) if type(v) is int else prefix + id_bytes(v) for v in values]
    except struct.error:  # an int beyond int64: let id_bytes raise its usual error
        return [prefix + id_bytes(v) for v in values]


def id_from_bytes(raw: bytes) -> Id:
    tag, body = raw[:1], raw[1:]
    if tag == b"i":
        return int.from_bytes(body, "big", signed=True)
    if tag == b"s":
        return body.decode("utf-8", "surrogatepass")
    raise FormatError(f"unknown id tag {tag!r}")


def offset_key(topic: str, partition: int) -> bytes:
    return OFFSET + topic.encode() + b"\0" + partition.to_bytes(4, "big")


def offset_from_key(key: bytes) -> tuple[str, int]:
    body = key[len(OFFSET):]
    return body[:-5].decode(), int.from_bytes(body[-4:], "big")


def event_hash(event_id: str) -> int:
    """Stable 64-bit hash of an event id (dedupe memory and the tie-break of equal timestamps).

    Python's ``hash`` is salted per process, so it cannot be persisted."""
    return int.from_bytes(event_hash_packed(event_id), "little")


def event_hash_packed(event_id: str) -> bytes:
    """:func:`event_hash` as it is stored: 8 bytes, little-endian (no int in between)."""
    return blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()


# -- records ------------------------------------------------------------------------------------
class UserRecord(msgspec.Struct, array_like=True):
    """A user's kept behaviours (oldest first, ordered by (ts, event hash)) and counters.

    ``ts`` is packed int64 little-endian (one per behaviour) so reads can hand it to numpy
    without a Python loop. Counters are ``[total, t1, b1, ...]`` (see :mod:`featurestore.logic`)."""

    items: bytes | list[Id] = b""   # packed int64 when every id is an int, else a list (pack_ids)
    cats: bytes | list[Id] = b""
    behaviors: bytes = b""          # one code per behaviour (BEHAVIOR_CODES)
    ts: bytes = b""
    impressions: list[int] = msgspec.field(default_factory=lambda: [0])
    clicks: list[int] = msgspec.field(default_factory=lambda: [0])
    profile: dict[str, Any] | None = None
    profile_ts: int = -1


class DedupeRecord(msgspec.Struct, array_like=True):
    """Event-id hashes remembered per user: the kept behaviours' (parallel to ``UserRecord``)
    and the most recently arrived impressions' (bounded FIFO, hashes and ts packed 8 bytes each).
    All packed little-endian (hashes unsigned): a bytes copy to decode, no int objects."""

    seq_hashes: bytes = b""
    imp_hashes: bytes = b""
    imp_ts: bytes = b""
    imp_floor_ts: int = -1          # newest ts among forgotten impression ids


class ItemRecord(msgspec.Struct, array_like=True):
    """An item's latest-known category and side features, and its counters (this partition's view)."""

    category_id: Id | None = None
    features: dict[str, Any] | None = None
    features_ts: int = -1
    impressions: list[int] = msgspec.field(default_factory=lambda: [0])
    clicks: list[int] = msgspec.field(default_factory=lambda: [0])


class SequenceView(msgspec.Struct, array_like=True, gc=False):
    """The first four fields of a :class:`UserRecord`: what reads decode (the trailing
    counters and profile are skipped, not built). Not tracked by the garbage collector (it
    holds no containers of its own objects): 256 of them per read would otherwise trigger
    collections, which show up as read-latency spikes."""

    items: bytes | list[Id] = b""
    cats: bytes | list[Id] = b""
    behaviors: bytes = b""
    ts: bytes = b""


_encoder = msgspec.msgpack.Encoder()
_decoders = {cls: msgspec.msgpack.Decoder(cls) for cls in (UserRecord, DedupeRecord, ItemRecord, SequenceView)}


def encode(record: UserRecord | DedupeRecord | ItemRecord, last_ts: int) -> bytes:
    """Version byte + last-active event time + msgpack body."""
    return _HEADER.pack(FORMAT_VERSION, last_ts) + _encoder.encode(record)


def decode(cls: type, raw: bytes | None):
    """The record in ``raw``, or a fresh empty one when ``raw`` is None."""
    if raw is None:
        return cls()
    if not raw or raw[0] != FORMAT_VERSION:
        raise FormatError(f"unknown record format {raw[:1]!r}")
    try:
        return _decoders[cls].decode(memoryview(raw)[HEADER_SIZE:])
    except msgspec.DecodeError as e:
        raise FormatError(f"corrupt {cls.__name__}: {e}") from None


def decode_sequences(raws: list) -> list[SequenceView]:
    """Sequence columns of the present records in ``raws`` (None entries skipped), fast path."""
    dec = _decoders[SequenceView].decode
    try:
        return [dec(memoryview(r)[HEADER_SIZE:]) for r in raws if r is not None and r[0] == FORMAT_VERSION]
    except msgspec.DecodeError as e:
        raise FormatError(f"corrupt user record: {e}") from None


def last_active(raw: bytes) -> int:
    """The header's last-active event time, without decoding the body."""
    version, ts = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise FormatError(f"unknown record format {version}")
    return ts


def pack_ids(ids: list | tuple) -> bytes | list:
    """A column of ids: packed int64 (no Python objects to decode, straight into numpy) when
    they are all ints, else a list of them (strings, or a mix)."""
    try:
        return array("q", ids).tobytes()
    except (TypeError, OverflowError):
        return list(ids)


def unpack_ids(column: bytes | list) -> list:
    return array("q", column).tolist() if isinstance(column, bytes) else column


def pack_int(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def unpack_int(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)
