"""Event contracts of SPEC section 3: typed structures, strict JSON encode/decode, validation.

Every message is one UTF-8 JSON object with a ``schema`` version. Decoding is strict (unknown
fields, wrong types, out-of-bound values are errors) and never raises anything but
:class:`ContractError`, whose ``reason`` is what goes into the dead-letter envelope.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1

# Static bounds; the per-deployment ones (message size, list lengths, timestamps) come from
# ``LimitSettings`` and are checked in :class:`Codec`.
_MAX_INT_ID = (1 << 63) - 1
IntId = Annotated[int, Meta(ge=0, le=_MAX_INT_ID)]
StrId = Annotated[str, Meta(min_length=1, max_length=512)]
Id = Union[IntId, StrId]
MAX_TS = 1 << 53  # event times in ms (and integers JSON readers keep exactly)
Ts = Annotated[int, Meta(ge=0, le=MAX_TS)]
FiniteFloat = Annotated[float, Meta(ge=-1e30, le=1e30)]  # also rejects inf; NaN is not JSON
Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
Count = Annotated[int, Meta(ge=0, le=(1 << 53))]
Version = Annotated[int, Meta(ge=1, le=(1 << 53))]
ShortStr = Annotated[str, Meta(max_length=256)]
Scalar = Union[int, FiniteFloat, ShortStr, bool]
FieldMap = dict[Annotated[str, Meta(min_length=1, max_length=64)], Scalar]
Behavior = Literal["click", "cart", "fav", "buy"]
BEHAVIORS: tuple[str, ...] = ("click", "cart", "fav", "buy")


class ContractError(ValueError):
    """A message that does not parse or violates its contract. ``reason`` is short and stable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Event(Struct, forbid_unknown_fields=True, kw_only=True):
    schema: Literal[1] = SCHEMA_VERSION


class Impression(_Event, kw_only=True):
    """An item shown to a user (a training sample once its label is known)."""

    event_id: StrId
    user_id: Id
    item_id: Id
    category_id: Id
    ts: Ts
    request_id: StrId | None = None
    position: Annotated[int, Meta(ge=0, le=10_000)] | None = None
    context: FieldMap | None = None
    user_profile: FieldMap | None = None
    item_features: FieldMap | None = None
    # Set by the simulator only: the true click probability (oracle AUC). Models never read it.
    true_ctr: Prob | None = None
    # Set by replay for negatives it sampled (Taobao UserBehavior has no real non-clicks).
    sampled: bool = False


class Click(_Event, kw_only=True):
    """A user behaviour on an item: a click by default, or cart/fav/buy."""

    event_id: StrId
    user_id: Id
    item_id: Id
    category_id: Id
    ts: Ts
    behavior: Behavior = "click"
    request_id: StrId | None = None


class Candidate(Struct, forbid_unknown_fields=True, omit_defaults=True):
    item_id: Id
    category_id: Id
    item_features: FieldMap | None = None


class ScoreRequest(_Event, kw_only=True):
    request_id: StrId
    user_id: Id
    candidates: list[Candidate]
    ts: Ts
    context: FieldMap | None = None


class ItemScore(Struct, forbid_unknown_fields=True):
    item_id: Id
    score: Prob


class Score(_Event, kw_only=True):
    request_id: StrId
    user_id: Id
    model_version: Count
    scores: list[ItemScore]
    ts: Ts
    latency_ms: Annotated[float, Meta(ge=0.0, le=1e9)]


class Sample(_Event, kw_only=True):
    """Everything the trainer needs with no further look-up (SPEC section 3).

    The behaviour sequence is stored column-wise, oldest first, as it was strictly before the
    impression; ``counters`` are the point-in-time real-time counter features.
    """

    sample_id: StrId
    event_id: StrId
    user_id: Id
    item_id: Id
    category_id: Id
    ts: Ts
    label: Literal[0, 1]
    hist_item_ids: list[Id] = []
    hist_category_ids: list[Id] = []
    hist_behaviors: list[Behavior] = []
    hist_ts: list[Ts] = []
    position: Annotated[int, Meta(ge=0, le=10_000)] | None = None
    context: FieldMap | None = None
    user_profile: FieldMap | None = None
    item_features: FieldMap | None = None
    counters: dict[Annotated[str, Meta(max_length=64)], FiniteFloat] | None = None
    served_score: Prob | None = None
    served_version: Count | None = None
    correction: bool = False
    sampled: bool = False
    true_ctr: Prob | None = None


class ModelUpdate(_Event, kw_only=True):
    version: Version
    kind: Literal["full", "delta"]
    base_version: Version | None = None
    uri: Annotated[str, Meta(min_length=1, max_length=4096)]
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    created_at: Ts
    trained_until_ts: Ts
    samples_seen: Count
    metrics: dict[Annotated[str, Meta(max_length=64)], FiniteFloat] = {}


# Most of a rejected message's bytes kept in its envelope. The envelope (base64: 4/3 of this,
# plus reason and key) must fit the producer's 1 MiB request limit and real Kafka's default
# message.max.bytes, or dead-lettering an oversized message would itself fail (and stop the
# component). Longer originals keep their head; ``truncated`` and ``original_bytes`` say so.
DEAD_LETTER_MAX_ORIGINAL = 512 * 1024
DEAD_LETTER_MAX_KEY = 4096


class DeadLetter(Struct, kw_only=True, omit_defaults=True):
    """Envelope for a rejected message: why, where from, and the original bytes (base64 in JSON);
    an original over :data:`DEAD_LETTER_MAX_ORIGINAL` keeps its head (``truncated``, with its
    full length in ``original_bytes``)."""

    schema: int = SCHEMA_VERSION
    reason: str
    component: str
    source_topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    key: bytes | None = None
    original: bytes
    ts: int = 0
    truncated: bool = False
    original_bytes: int | None = None


Contract = Union[Impression, Click, ScoreRequest, Score, Sample, ModelUpdate]
T = TypeVar("T", Impression, Click, ScoreRequest, Score, Sample, ModelUpdate)

_encoder = msgspec.json.Encoder()


def encode(event: Contract) -> bytes:
    """Compact JSON bytes of an event (the ``type`` tag and ``schema`` included)."""
    return _encoder.encode(event)


class Codec:
    """Strict decoder for one contract with the deployment's limits.

    ``decode`` returns the typed event or raises :class:`ContractError`; nothing else escapes.
    """

    def __init__(self, contract: type[T], limits: Any = None):
        from dmrstream.settings import LimitSettings

        self.contract = contract
        self.limits = limits or LimitSettings()
        self._decoder = msgspec.json.Decoder(contract)
        # A contract that forbids unknown fields has msgspec parse every byte (strings are
        # validated as UTF-8, anything else outside them is a syntax error), so a payload that
        # decodes is valid UTF-8: the explicit check (a copy and a decode of the whole payload,
        # ~4 % of the streamer's processing) is needed only to name the reason of a failure.
        self._parse_checks_utf8 = bool(contract.__struct_config__.forbid_unknown_fields)

    def decode(self, raw: bytes | bytearray | memoryview | None) -> T:
        self._check_size(raw)
        if not self._parse_checks_utf8:
            _check_utf8(raw)
        try:
            event = self._decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError, MemoryError, ValueError, TypeError, OverflowError) as e:
            _check_utf8(raw)  # invalid UTF-8 is the reason named, whatever the parse tripped on
            raise ContractError(_parse_failure(e)) from None
        _check_limits(event, self.limits)
        return event

    def check_payload(self, raw: Any) -> None:
        """The checks before parsing: bytes, not empty, within the size limit, valid UTF-8."""
        self._check_size(raw)
        _check_utf8(raw)

    def _check_size(self, raw: Any) -> None:
        if raw is None:
            raise ContractError("empty: null payload (tombstone)")
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise ContractError(f"type: payload is {type(raw).__name__}, not bytes")
        if len(raw) > self.limits.max_message_bytes:
            raise ContractError(f"size: {len(raw)} bytes > {self.limits.max_message_bytes}")
        if len(raw) == 0:
            raise ContractError("empty: zero-length payload")


def _check_utf8(raw: bytes | bytearray | memoryview) -> None:
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContractError(f"utf8: invalid UTF-8 at byte {e.start}") from None


def _parse_failure(e: Exception) -> str:
    if isinstance(e, msgspec.ValidationError):  # a DecodeError too: tested first
        return f"invalid: {_short(e)}"
    if isinstance(e, msgspec.DecodeError):
        return f"malformed: {_short(e)}"
    return f"malformed: {type(e).__name__}"


def _short(e: Exception) -> str:
    s = str(e)
    return s if len(s) <= 200 else s[:200] + "..."


def _check_id(name: str, value: Any, limits: Any) -> None:
    if isinstance(value, str) and len(value) > limits.max_id_length:
        raise ContractError(f"limit: {name} longer than {limits.max_id_length}")


def _check_ts(name: str, ts: int, limits: Any) -> None:
    if not limits.min_ts_ms <= ts <= limits.max_ts_ms:
        raise ContractError(f"limit: {name}={ts} outside [{limits.min_ts_ms}, {limits.max_ts_ms}] ms")


def _check_fields(name: str, fields: dict | None, limits: Any) -> None:
    if fields is not None and len(fields) > limits.max_fields:
        raise ContractError(f"limit: {name} has {len(fields)} fields > {limits.max_fields}")


_ID_FIELDS = {
    "Impression": ("user_id", "item_id", "category_id", "event_id", "request_id"),
    "Click": ("user_id", "item_id", "category_id", "event_id", "request_id"),
    "ScoreRequest": ("user_id", "request_id"),
    "Score": ("user_id", "request_id"),
    "Sample": ("user_id", "item_id", "category_id", "event_id", "sample_id"),
    "ModelUpdate": (),
}
_MAP_FIELDS = {
    "Impression": ("context", "user_profile", "item_features"),
    "Click": (),
    "ScoreRequest": ("context",),
    "Score": (),
    "Sample": ("context", "user_profile", "item_features", "counters"),
    "ModelUpdate": ("metrics",),
}


_IS_INT = int.__instancecheck__


def _check_limits(event: Any, limits: Any) -> None:
    """Deployment bounds msgspec's static types cannot express (hot path: one pass per field)."""
    name = type(event).__name__
    check_field_limits(event, name, limits)
    if name in ("Impression", "Click"):
        return
    _check_collections(event, limits)


def check_field_limits(event: Any, name: str, limits: Any) -> None:
    """The deployment bounds of ids, ``ts`` and maps of an event of the contract ``name`` (its
    class name) or of a struct with the same fields (the trainer's columnar sample decoding
    checks the sequences itself, in bulk)."""
    max_id = limits.max_id_length
    for f in _ID_FIELDS[name]:
        v = getattr(event, f)
        if v.__class__ is str and len(v) > max_id:
            raise ContractError(f"limit: {f} longer than {max_id}")
    ts = getattr(event, "ts", None)
    if ts is not None and not limits.min_ts_ms <= ts <= limits.max_ts_ms:
        _check_ts("ts", ts, limits)
    for f in _MAP_FIELDS[name]:
        m = getattr(event, f)
        if m is not None and len(m) > limits.max_fields:
            _check_fields(f, m, limits)


def _check_collections(event: Any, limits: Any) -> None:
    if isinstance(event, ScoreRequest):
        if not event.candidates:
            raise ContractError("invalid: candidates is empty")
        if len(event.candidates) > limits.max_candidates:
            raise ContractError(f"limit: {len(event.candidates)} candidates > {limits.max_candidates}")
        for c in event.candidates:
            _check_id("candidates.item_id", c.item_id, limits)
            _check_id("candidates.category_id", c.category_id, limits)
            _check_fields("candidates.item_features", c.item_features, limits)
    elif isinstance(event, Score):
        if len(event.scores) > limits.max_candidates:
            raise ContractError(f"limit: {len(event.scores)} scores > {limits.max_candidates}")
    elif isinstance(event, Sample):
        n = len(event.hist_item_ids)
        if n > limits.max_sequence:
            raise ContractError(f"limit: sequence of {n} > {limits.max_sequence}")
        if not (len(event.hist_category_ids) == len(event.hist_behaviors) == len(event.hist_ts) == n):
            raise ContractError("invalid: sequence columns differ in length")
        if n and max(event.hist_ts) >= event.ts:
            raise ContractError("invalid: sequence holds a behaviour not strictly before the impression")
        # ids are mostly ints: all(map(...)) checks that in C; only strings need their length
        for ids in (event.hist_item_ids, event.hist_category_ids):
            if not all(map(_IS_INT, ids)):
                for v in ids:
                    _check_id("hist ids", v, limits)
    elif isinstance(event, ModelUpdate):
        _check_ts("created_at", event.created_at, limits)
        if event.kind == "delta" and event.base_version is None:
            raise ContractError("invalid: delta without base_version")
        if event.base_version is not None and event.base_version >= event.version:
            raise ContractError("invalid: base_version must be older than version")
        for v in event.metrics.values():
            if not math.isfinite(v):
                raise ContractError("invalid: non-finite metric")


def dead_letter(reason: str, original: bytes | None, component: str, *, topic: str | None = None,
                partition: int | None = None, offset: int | None = None, key: bytes | None = None) -> bytes:
    """Encoded dead-letter envelope for a rejected message (small enough to produce whatever the
    original's size: see :data:`DEAD_LETTER_MAX_ORIGINAL`)."""
    raw = bytes(original or b"")
    cut = len(raw) > DEAD_LETTER_MAX_ORIGINAL
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY:
        key, cut = bytes(key[:DEAD_LETTER_MAX_KEY]), True
    return _encoder.encode(DeadLetter(
        reason=reason[:1000], component=component, source_topic=topic, partition=partition,
        offset=offset, key=key, original=raw[:DEAD_LETTER_MAX_ORIGINAL], ts=int(time.time() * 1000),
        truncated=cut, original_bytes=len(raw) if cut else None))


def dead_letter_of(reason: str, record: Any, component: str) -> tuple[bytes | None, bytes]:
    """(key, value) to produce on the dead-letters topic for a consumed ``record`` (anything with
    topic, partition, offset, key, value). The key is the original's cut to
    :data:`DEAD_LETTER_MAX_KEY` bytes: a key over the producer's request limit would make the
    dead-letter send itself fail, and the message could then never leave its topic."""
    key = record.key
    return (None if key is None else bytes(key[:DEAD_LETTER_MAX_KEY]),
            dead_letter(reason, record.value, component, topic=record.topic, partition=record.partition,
                        offset=record.offset, key=key))


def decode_dead_letter(raw: bytes) -> DeadLetter:
    return msgspec.json.decode(raw, type=DeadLetter)
