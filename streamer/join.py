"""Event-time label join of impressions and clicks (SPEC section 5). Pure logic, no I/O.

One :class:`LabelJoin` per partition. An impression waits up to the attribution window ``W`` of
event time for its click, of the same (user, item): the one of the click's ``request_id`` when
both carry one (a request shows several items, so never another request's), else the nearest
earlier impression inside ``W``. When the watermark passes ``ts + W``, the impression goes
out with label 1 if a click matched it, else 0 (``positives_at="window_close"``, the default), so
samples leave in impression-time order whatever their label. ``positives_at="click"`` emits a
positive at its click instead: fresher, but a learner then sees every positive up to ``W`` before
the negatives of the same moment (on MovieLens that costs ~0.005 prequential AUC). Clicks for an
impression already emitted as 0 are *late*: counted and, optionally, emitted as corrections.

The watermark is the minimum over the inputs (impressions, clicks) of the highest event time seen
on each, minus the allowed lateness. Taking the minimum, not the overall maximum, keeps a fast
impressions topic from expiring impressions whose clicks simply have not been fetched yet; an
input marked idle (no data for a while) drops out of the minimum so the watermark still advances.

State changes are recorded as key -> bytes puts/deletes (:meth:`drain_changes`) so the caller can
write them in the same atomic batch as the feature store and the consumed offsets. Records are
encoded when drained, not at each change, and a key created and deleted between two drains (most
impressions labelled within one batch) is neither encoded nor written: not even as a delete.
"""

from __future__ import annotations

import heapq
from collections import deque
from operator import attrgetter
from typing import Any, Callable, Iterable, Literal

import msgspec

Kind = Literal["positive", "negative", "late_click", "correction"]
PositivesAt = Literal["window_close", "click"]
_PENDING, _DONE, _EARLY, _HIGH = b"p/", b"d/", b"e/", b"h/"
_BY_TS = attrgetter("ts")

# The join's records hold only strings, ints and bytes: they can never be part of a reference
# cycle, so they are not tracked by the garbage collector (gc=False). A partition holds every
# impression of the last W (and the finished ones for W more): tracked, each collection of the
# oldest generation would walk all of them. (No gain measurable in bench/streamer.py, whose
# partitions hold ~3,000 of them; a 30-minute window of a busy partition holds millions.)


class Pending(msgspec.Struct, array_like=True, gc=False):
    """An impression waiting for its label; ``raw`` is its original message."""

    event_id: str
    user_id: str
    item_id: str
    ts: int
    request_id: str | None
    raw: bytes
    extra: bytes = b""  # caller's data frozen at arrival (the point-in-time counters)
    click_ts: int | None = None  # its click, held until the window closes (positives_at="window_close")


class Done(msgspec.Struct, array_like=True, gc=False):
    """An impression already emitted, remembered for late clicks and redelivery."""

    event_id: str
    user_id: str
    item_id: str
    ts: int
    request_id: str | None
    label: int
    raw: bytes = b""  # kept only when corrections are emitted (they need the impression)


class EarlyClick(msgspec.Struct, array_like=True, gc=False):
    """A click read before its impression (the two topics are fetched independently)."""

    event_id: str
    user_id: str
    item_id: str
    ts: int
    request_id: str | None


class Outcome(msgspec.Struct, gc=False):
    kind: Kind
    impression_id: str
    impression_ts: int
    raw: bytes | None = None  # the impression's message, for positives and negatives
    click_ts: int | None = None
    extra: bytes = b""


_enc = msgspec.msgpack.Encoder()
_dec = {_PENDING: msgspec.msgpack.Decoder(Pending), _DONE: msgspec.msgpack.Decoder(Done),
        _EARLY: msgspec.msgpack.Decoder(EarlyClick)}


class Deadlines:
    """Ids in deadline order, for expiry. The merge releases events in event-time order, so
    impressions almost always reach the join in deadline order: those ids go to a deque (an 8-byte
    slot each), the rest to a heap of (deadline, id) (~96 bytes each, a tuple and an int). The
    join holds one per waiting and one per finished impression."""

    __slots__ = ("_order", "_late", "_last", "_next", "_deadline")

    def __init__(self, deadline: Callable[[str], int | None]):
        self._order: deque[str] = deque()
        self._late: list[tuple[int, str]] = []
        self._last = 0  # deadline of the deque's newest id
        self._next: int | None = None  # no due id before this (may be a gone id's: then early, harmless)
        self._deadline = deadline  # an id's deadline now, None once the id is gone

    def __len__(self) -> int:
        return len(self._order) + len(self._late)

    def push(self, eid: str) -> None:
        """Add an id whose record is in place (its deadline is read from it)."""
        deadline = self._deadline(eid)
        if not self._order or deadline >= self._last:
            self._order.append(eid)
            self._last = deadline
        else:
            heapq.heappush(self._late, (deadline, eid))
        if self._next is None or deadline < self._next:
            self._next = deadline

    def any_due(self, wm: int) -> bool:
        return self._next is not None and self._next < wm

    def pop_due(self, wm: int) -> list[str]:
        """Ids whose deadline is before ``wm``, in (deadline, id) order (as one heap of all would
        give them); the heap's may be gone since, the deque's are not."""
        due: list[tuple[int, str]] = []
        order, late, deadline = self._order, self._late, self._deadline
        head = None
        while order:
            head = deadline(order[0])
            if head is None:
                order.popleft()  # gone (a click labelled it)
            elif head < wm:
                due.append((head, order.popleft()))
                head = None
            else:
                break
        while late and late[0][0] < wm:
            due.append(heapq.heappop(late))
        if late and (head is None or late[0][0] < head):
            head = late[0][0]
        self._next = head
        if len(due) > 1:
            due.sort()
        return [eid for _, eid in due]


class LabelJoin:
    """The join state of one partition. Feed events in consumption order; emit what it returns."""

    def __init__(self, window_ms: int, lateness_ms: int = 0, emit_corrections: bool = False,
                 late_horizon_ms: int | None = None, inputs: Iterable[str] = ("impressions", "clicks"),
                 positives_at: PositivesAt = "window_close"):
        if positives_at not in ("window_close", "click"):
            raise ValueError(f"positives_at must be 'window_close' or 'click', not {positives_at!r}")
        self.hold_positives = positives_at == "window_close"
        self.window = window_ms
        self.lateness = lateness_ms
        self.emit_corrections = emit_corrections
        # How long after its window an emitted impression is remembered to recognise late clicks.
        self.late_horizon = window_ms if late_horizon_ms is None else late_horizon_ms
        self.inputs = tuple(inputs)
        self.high: dict[str, int] = {}
        self.idle: set[str] = set()
        self.pending: dict[str, Pending] = {}
        self.done: dict[str, Done] = {}
        self.early: dict[str, EarlyClick] = {}
        # (user, item) -> its early clicks (arrival order): an impression looks only at those of
        # its own pair, not at every click held (with allowed lateness, a partition holds many).
        self._early_by_pair: dict[tuple[str, str], dict[str, EarlyClick]] = {}
        # (user, item) -> the impression id, or a set of them when several: most pairs have one,
        # and a set per pair was a third of the memory of a waiting impression.
        self._by_user_item: dict[tuple[str, str], str | set[str]] = {}
        self._pending_due = Deadlines(self._pending_deadline)
        self._done_due = Deadlines(self._done_deadline)
        self._early_heap: list[tuple[int, str]] = []
        self._changes: dict[bytes, Any] = {}  # key -> record to put (encoded when drained) or None
        self._created: set[bytes] = set()  # keys of _changes first put since the last drain: not persisted
        self._high_moved: set[str] = set()  # inputs whose highest time moved since drain_changes
        self.duplicates = 0
        self._watermark: int | None = None  # kept current by _observe, set_idle and restore

    # -- watermark ------------------------------------------------------------------------
    @property
    def watermark(self) -> int | None:
        """Minimum over the active inputs of the highest event time seen, minus the lateness."""
        return self._watermark

    def _update_watermark(self) -> None:
        idle = self.idle
        active = [ts for name, ts in self.high.items() if name not in idle] if idle else self.high.values()
        self._watermark = min(active) - self.lateness if active else None

    def set_idle(self, source: str, idle: bool) -> list[Outcome]:
        """Mark an input idle (excluded from the watermark) or active again."""
        (self.idle.add if idle else self.idle.discard)(source)
        self._update_watermark()
        return self._expire()

    def _observe(self, source: str, ts: int) -> None:
        # Called for every event: the watermark is recomputed only when an input's mark moves.
        high = self.high
        if ts > high.get(source, -1):
            high[source] = ts
            self._high_moved.add(source)  # its key is written by drain_changes
        elif source not in self.idle:
            return
        if self.idle:
            self.idle.discard(source)
        self._update_watermark()

    # -- events ---------------------------------------------------------------------------
    def on_impression(self, event_id: str, user_id: object, item_id: object, ts: int,
                      request_id: str | None, raw: bytes, source: str = "impressions",
                      extra: bytes = b"") -> list[Outcome]:
        """An impression arrived. Returns what to emit (a positive if its click came first)."""
        self._observe(source, ts)
        if event_id in self.pending or event_id in self.done:
            self.duplicates += 1
            return self._expire()
        imp = Pending(event_id, str(user_id), str(item_id), ts, request_id, raw, extra)
        click = self._take_early_click(imp)
        out: list[Outcome] = []
        if click is not None and not self.hold_positives:
            self._finish(imp, 1, indexed=False)
            out.append(Outcome("positive", event_id, ts, raw, click.ts, extra))
        else:
            imp.click_ts = None if click is None else click.ts
            self._add_pending(imp)
        return out + self._expire()

    def on_click(self, event_id: str, user_id: object, item_id: object, ts: int,
                 request_id: str | None, source: str = "clicks") -> list[Outcome]:
        """A click arrived. Returns a positive (``positives_at="click"``), a late click (and
        correction), or nothing; with ``"window_close"`` the match is held until the window closes."""
        self._observe(source, ts)
        user, item = str(user_id), str(item_id)
        target = self._match(user, item, ts, request_id)
        out: list[Outcome] = []
        if target is None:
            if event_id in self.early:
                self.duplicates += 1
            elif self.watermark is None or ts >= self.watermark:
                # Its impression may still be on its way: keep the click until the watermark passes it.
                e = EarlyClick(event_id, user, item, ts, request_id)
                self._add_early(e)
                self._create(_EARLY + event_id.encode(), e)
        elif target in self.pending:
            imp = self.pending[target]
            if imp.click_ts is not None:
                self.duplicates += 1  # a second click on an impression already clicked, held to its window
            elif self.hold_positives:
                imp.click_ts = ts
                self._changes[_PENDING + target.encode()] = imp
            else:
                del self.pending[target]
                self._delete(_PENDING + target.encode())
                self._finish(imp, 1)
                out.append(Outcome("positive", imp.event_id, imp.ts, imp.raw, ts, imp.extra))
        else:
            done = self.done[target]
            if done.label == 0:
                out.append(Outcome("late_click", done.event_id, done.ts, None, ts))
                if self.emit_corrections:
                    out.append(Outcome("correction", done.event_id, done.ts, done.raw, ts))
                # One late click per impression: remember that it was labelled after all.
                done.label = 1
                self._changes[_DONE + target.encode()] = done
            else:
                self.duplicates += 1  # a second click on an already positive impression
        return out + self._expire()

    def _match(self, user: str, item: str, ts: int, request_id: str | None) -> str | None:
        """The impression a click labels: one of the same (user, item) inside the window. A
        request shows several items under one id, so the request id alone names none of them: it
        ranks first the impression of the click's own request, and rules out other requests'."""
        best: tuple[int, int, int, str] | None = None
        ids = self._by_user_item.get((user, item), ())
        for cand in (ids,) if type(ids) is str else ids:
            rec = self.pending.get(cand) or self.done[cand]
            if request_id is not None and rec.request_id not in (None, request_id):
                continue  # a click that names its request never labels another request's impression
            if rec.ts <= ts <= rec.ts + self.window:
                # Then the nearest earlier impression still waiting; an already labelled one only
                # when none waits (that is how a late click is recognised).
                waiting = isinstance(rec, Pending) and rec.click_ts is None
                key = (1 if request_id is not None and rec.request_id == request_id else 0,
                       1 if waiting else 0, rec.ts, cand)
                if best is None or key > best:
                    best = key
        return best[3] if best else None

    def _take_early_click(self, imp: Pending) -> EarlyClick | None:
        """The held click of ``imp``'s (user, item) inside its window: its request's if any, else
        the earliest one naming no request."""
        found: EarlyClick | None = None
        for e in self._early_by_pair.get((imp.user_id, imp.item_id), {}).values():
            if not imp.ts <= e.ts <= imp.ts + self.window:
                continue
            if imp.request_id is not None and e.request_id == imp.request_id:
                found = e
                break
            if e.request_id is None and (found is None or e.ts < found.ts):
                found = e
        if found is not None:
            self._drop_early(found.event_id)
            self._delete(_EARLY + found.event_id.encode())
        return found

    def _add_early(self, e: EarlyClick) -> None:
        self.early[e.event_id] = e
        self._early_by_pair.setdefault((e.user_id, e.item_id), {})[e.event_id] = e
        heapq.heappush(self._early_heap, (e.ts, e.event_id))

    def _drop_early(self, event_id: str) -> EarlyClick | None:
        e = self.early.pop(event_id, None)
        if e is not None:
            pair = (e.user_id, e.item_id)
            mine = self._early_by_pair[pair]
            del mine[event_id]
            if not mine:
                del self._early_by_pair[pair]
        return e

    # -- bookkeeping ----------------------------------------------------------------------
    def _index(self, rec: Pending | Done) -> None:
        pair, eid = (rec.user_id, rec.item_id), rec.event_id
        ids = self._by_user_item.get(pair)
        if ids is None:
            self._by_user_item[pair] = eid
        elif type(ids) is str:
            if ids != eid:
                self._by_user_item[pair] = {ids, eid}
        else:
            ids.add(eid)

    def _unindex(self, rec: Done) -> None:
        pair = (rec.user_id, rec.item_id)
        ids = self._by_user_item.get(pair)
        if ids is None:
            return
        if type(ids) is str:
            if ids == rec.event_id:
                del self._by_user_item[pair]
            return
        ids.discard(rec.event_id)
        if len(ids) == 1:
            self._by_user_item[pair] = next(iter(ids))
        elif not ids:
            del self._by_user_item[pair]

    def _add_pending(self, imp: Pending) -> None:
        self.pending[imp.event_id] = imp
        self._index(imp)
        self._pending_due.push(imp.event_id)
        self._create(_PENDING + imp.event_id.encode(), imp)

    def _finish(self, imp: Pending, label: int, indexed: bool = True) -> None:
        """``imp`` is done; ``indexed``: it was pending, so the indexes already name its id."""
        done = Done(imp.event_id, imp.user_id, imp.item_id, imp.ts, imp.request_id, label,
                    imp.raw if self.emit_corrections else b"")
        self.done[imp.event_id] = done
        if not indexed:
            self._index(done)
        self._done_due.push(imp.event_id)
        self._create(_DONE + imp.event_id.encode(), done)

    def _pending_deadline(self, eid: str) -> int | None:
        imp = self.pending.get(eid)
        return None if imp is None else imp.ts + self.window

    def _done_deadline(self, eid: str) -> int | None:
        done = self.done.get(eid)
        return None if done is None else done.ts + self.window + self.late_horizon

    def _expire(self) -> list[Outcome]:
        wm = self._watermark
        if wm is None or not (self._pending_due.any_due(wm) or self._done_due.any_due(wm)
                              or (self._early_heap and self._early_heap[0][0] < wm)):
            return []  # nothing due: the common case, checked before any work
        out: list[Outcome] = []
        for eid in self._pending_due.pop_due(wm):
            imp = self.pending.pop(eid, None)
            if imp is None:
                continue  # labelled by a click already
            self._delete(_PENDING + eid.encode())
            label = 0 if imp.click_ts is None else 1
            self._finish(imp, label)
            out.append(Outcome("positive" if label else "negative", eid, imp.ts, imp.raw, imp.click_ts, imp.extra))
        for eid in self._done_due.pop_due(wm):
            done = self.done.pop(eid, None)
            if done is not None:
                self._unindex(done)
                self._delete(_DONE + eid.encode())
        while self._early_heap and self._early_heap[0][0] < wm:
            _, eid = heapq.heappop(self._early_heap)
            if self._drop_early(eid) is not None:
                self._delete(_EARLY + eid.encode())
        return out

    # -- persistence ----------------------------------------------------------------------
    def _create(self, key: bytes, record: Pending | Done | EarlyClick) -> None:
        """Put a record whose key the persisted state does not hold (a new id)."""
        if key not in self._changes:  # else deleted since the last drain: that delete must stay
            self._created.add(key)
        self._changes[key] = record

    def _delete(self, key: bytes) -> None:
        if key in self._created:  # never persisted: nothing to delete
            self._created.discard(key)
            del self._changes[key]
        else:
            self._changes[key] = None

    def drain_changes(self) -> dict[bytes, bytes | None]:
        """Keys changed since the last call: bytes to put, or None to delete."""
        encode = _enc.encode
        changes = {k: None if v is None else encode(v) for k, v in self._changes.items()}
        self._changes = {}
        self._created.clear()
        for source in self._high_moved:
            changes[_HIGH + source.encode()] = self.high[source].to_bytes(8, "big", signed=True)
        self._high_moved.clear()
        return changes

    def restore(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Rebuild from the persisted key/value pairs written from :meth:`drain_changes`."""
        pending: list[Pending] = []
        for key, value in items:
            prefix, name = key[:2], key[2:].decode()
            if prefix == _HIGH:
                self.high[name] = int.from_bytes(value, "big", signed=True)
            elif prefix == _PENDING:
                pending.append(_dec[_PENDING].decode(value))
            elif prefix == _DONE:
                done = _dec[_DONE].decode(value)
                self.done[name] = done
                self._index(done)
            elif prefix == _EARLY:
                self._add_early(_dec[_EARLY].decode(value))
        # In time order (keys come in id order), so the deadlines go to the deques, not the heaps.
        for imp in sorted(pending, key=_BY_TS):
            self._add_pending(imp)
        for done in sorted(self.done.values(), key=_BY_TS):
            self._done_due.push(done.event_id)
        self._changes.clear()
        self._created.clear()
        self._high_moved.clear()
        self._update_watermark()
