"""One partition's feature store: a RocksDB (rocksdict) with atomic, idempotent batches.

Everything a consumed batch changes (user sequences and counters, item records, the consumed
offsets and the caller's own state) goes into ONE WriteBatch: after a crash the database holds
either all of a batch or none of it, and the committed offsets say exactly where to resume.
Redelivered events are recognised by their event id (see :mod:`featurestore.logic`), so
at-least-once delivery gives exactly-once state.
"""

from __future__ import annotations

import os
import shutil
from array import array
from bisect import bisect_left
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

from rocksdict import (AccessType, BlockBasedOptions, Cache, Checkpoint, DBCompressionType, Options,
                       Rdict, WriteBatch, WriteOptions)

from dmrstream.contracts import Click, Impression
from dmrstream.settings import FeatureSettings, Settings
from featurestore import logic
from featurestore.cache import RecordCache
from featurestore.codec import (BEHAVIOR_CODES, BEHAVIOR_NAMES, DEDUPE, EXTRA, ITEM, META, OFFSET, USER,
                                DedupeRecord, ItemRecord, UserRecord, decode, encode, event_hash, id_bytes,
                                id_from_bytes, id_keys, last_active, offset_from_key, offset_key, pack_int, unpack_ids, unpack_int)
from featurestore.reads import SequenceBatch, counters_dict, fill_sequences, history_columns

_BY_TS = attrgetter("ts")
# Default bound of a partition's record cache: holds ~25k users' records (sequence + dedupe)
# plus hot items, a partition's working set at the sizes the SPEC plans for.
RECORD_CACHE_MB = 64


class Behaviour(NamedTuple):
    """One kept behaviour, as returned by :meth:`PartitionStore.get_sequence`."""

    item_id: Any
    category_id: Any
    behavior: str
    ts: int


def _options(fs: FeatureSettings, cache: Cache | None) -> Options:
    opt = Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.set_compression_type(DBCompressionType.lz4())
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)  # multi-get of absent users skips the files
    if cache is None and fs.block_cache_mb:
        cache = Cache(fs.block_cache_mb << 20)
    if cache is not None:
        table.set_block_cache(cache)
    opt.set_block_based_table_factory(table)
    return opt


class PartitionStore:
    """The feature store of one Kafka partition, in its own RocksDB directory.

    ``settings`` is the whole :class:`Settings` or its ``features`` section. Open read-only to
    inspect a store that a running worker holds (RocksDB locks a directory to one writer).
    ``record_cache_mb`` bounds the write-through cache of encoded records (see
    :mod:`featurestore.cache`); 0 disables it.
    """

    def __init__(self, path: str | os.PathLike, settings: Settings | FeatureSettings | None = None, *,
                 read_only: bool = False, cache: Cache | None = None,
                 record_cache_mb: float = RECORD_CACHE_MB):
        fs = settings.features if isinstance(settings, Settings) else (settings or FeatureSettings())
        self.path = Path(path)
        self.settings = fs
        self.seq_len = fs.seq_len
        self.keep = fs.seq_len + fs.seq_keep_extra
        self.read_only = read_only
        if not read_only:
            self.path.mkdir(parents=True, exist_ok=True)
        access = AccessType.read_only() if read_only else AccessType.read_write()
        self._db = Rdict(str(self.path), _options(fs, cache), access_type=access)
        self._write_opt = WriteOptions()
        self._write_opt.sync = fs.fsync
        # Read-only handles see a fixed view and gain nothing from it: cache only for the owner.
        self._cache = RecordCache(0 if read_only else int(record_cache_mb * (1 << 20)))

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Flush nothing extra (the WAL already holds every batch) and release the directory."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "PartitionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -----------------------------------------------------------------------------
    def apply(self, events: Iterable[Impression | Click], *, offsets: Mapping[tuple[str, int], int] | None = None,
              extra_changes: Mapping[bytes, bytes | None] | None = None, applied: set[str] | None = None,
              counters_at: dict[int, dict] | None = None) -> dict[str, int]:
        """Apply behaviour events (``Click``: click/cart/fav/buy) and impressions, and record
        ``offsets`` ({(topic, partition): next offset}) and the caller's ``extra_changes`` (its own
        keys, stored under a reserved prefix: key -> value, or None to delete), all in one atomic
        write. Events already applied change nothing. Returns tallies: behaviours, impressions
        (newly applied), duplicates, too_old, rejected (not an event this store understands).
        ``applied`` receives the ids of the events newly applied (what the counters now count).
        ``counters_at[id(impression)]`` receives, for every valid impression in ``events``, its
        point-in-time counters: :meth:`counters_as_of` its time as the store held them before
        this batch, plus this batch's newly applied events strictly before that time (what
        :meth:`counters_as_of` would say had the batch's events come one by one in time order).
        Read from the records this batch decodes anyway (no second read); a redelivered event
        counts once. A new dict per impression, the caller's to keep."""
        out = logic.Outcome()
        by_user = _group_by_user(events, out)
        wb = WriteBatch(raw_mode=True)
        records: list[tuple[bytes, bytes]] = []  # cached after the write succeeds
        if by_user:
            self._apply_users(by_user, records, out, applied, counters_at)
        for key, value in records:
            wb.put(key, value)
        for (topic, partition), offset in (offsets or {}).items():
            wb.put(offset_key(topic, partition), pack_int(offset))
        for key, value in (extra_changes or {}).items():
            if value is None:
                wb.delete(EXTRA + key)
            else:
                wb.put(EXTRA + key, bytes(value))
        if not wb.is_empty():
            self._db.write(wb, self._write_opt)
            self._cache.put_many(records)
        return out.as_dict()

    def _get_many(self, keys: list[bytes]) -> list:
        """Values of record keys (user, dedupe, item), through the write-through cache."""
        return self._cache.get_many(keys, self._db.get)

    def _apply_users(self, by_user: dict[bytes, list], records: list, out: logic.Outcome,
                     applied: set[str] | None = None, at: dict[int, dict] | None = None) -> None:
        keep, points, dedupe_n = self.keep, self.settings.counter_points, self.settings.dedupe_ids_per_user
        ukeys = list(by_user)
        n = len(ukeys)
        raws = self._get_many([USER + k for k in ukeys] + [DEDUPE + k for k in ukeys])
        # raw item id -> [(ts, is_click, category, features)] of the accepted events; keyed by the
        # raw id so that id_bytes runs once per distinct item, not once per event.
        item_events: dict[Any, list] = {}
        item_queries: list = []  # impressions whose item counters go into ``at``
        ev_hash = event_hash
        as_of_each = logic.counter_as_of_each
        for i, uk in enumerate(ukeys):
            raw_user = raws[i]
            user = decode(UserRecord, raw_user)
            dd = decode(DedupeRecord, raws[n + i])
            last = last_active(raw_user) if raw_user is not None else -1
            evs = by_user[uk]
            evs.sort(key=_BY_TS)
            behaviours, imps, id_of = [], [], {}
            for ev in evs:
                if type(ev) is Click:
                    h = ev_hash(ev.event_id)
                    behaviours.append((ev.ts, h, ev.item_id, ev.category_id, BEHAVIOR_CODES[ev.behavior]))
                    if applied is not None:
                        id_of[h] = ev.event_id
                else:
                    imps.append(ev)
            if at is not None and imps:  # the user's counters before anything changes them
                times = [ev.ts for ev in imps]
                stored = (as_of_each(user.impressions, times), as_of_each(user.clicks, times))
                item_queries += imps
            clicked, accepted = [], ()
            if behaviours:
                accepted = logic.merge_behaviours(user, dd, behaviours, keep, out)
                out.behaviours += len(accepted)
                if applied is not None:
                    applied.update(id_of[b[1]] for b in accepted)
                for ts, _, item, cat, code in accepted:
                    if code == 1:
                        clicked.append(ts)
                        row = (ts, True, cat, None)
                    else:
                        row = (ts, None, cat, None)
                    lst = item_events.get(item)
                    if lst is None:
                        item_events[item] = [row]
                    else:
                        lst.append(row)
                if accepted and accepted[-1][0] > last:  # accepted is sorted by ts
                    last = accepted[-1][0]
            new_imps, new_ts = [], []
            if imps:
                new_imps = logic.accept_impressions(dd, imps, dedupe_n, out)
                new_ts = [ev.ts for ev in new_imps]  # in time order, as imps
                if applied is not None:
                    applied.update([ev.event_id for ev in new_imps])
                out.impressions += len(new_imps)
            # Counters in event-time order (imps is sorted; clicks come sorted by (ts, hash)).
            if clicked:
                logic.counter_extend(user.clicks, clicked, points)
            if new_imps:
                logic.counter_extend(user.impressions, new_ts, points)
                for ev in new_imps:
                    ts = ev.ts
                    row = (ts, False, ev.category_id, ev.item_features)
                    lst = item_events.get(ev.item_id)
                    if lst is None:
                        item_events[ev.item_id] = [row]
                    else:
                        lst.append(row)
                    if ev.user_profile and ts >= user.profile_ts:
                        user.profile, user.profile_ts = dict(ev.user_profile), ts
                if new_imps[-1].ts > last:
                    last = new_imps[-1].ts
            if at is not None and imps:  # plus this batch's new events strictly before each time
                for ev, n_imps, n_clicks in zip(imps, *stored):
                    t = ev.ts
                    at[id(ev)] = {"user_impressions": n_imps + bisect_left(new_ts, t),
                                  "user_clicks": n_clicks + bisect_left(clicked, t),
                                  "item_impressions": 0.0, "item_clicks": 0.0}
            if accepted or new_imps:  # an all-duplicate batch writes nothing
                records.append((USER + uk, encode(user, last)))
                records.append((DEDUPE + uk, encode(dd, last)))
        if item_events or item_queries:
            self._apply_items(item_events, records, points, item_queries, at)

    def _apply_items(self, item_events: dict[Any, list], records: list, points: int,
                     queries: list = (), at: dict[int, dict] | None = None) -> None:
        by_key = _by_stored_id(item_events)
        by_item: dict[Any, list] = {}  # raw item id -> impressions wanting its counters
        for ev in queries:
            lst = by_item.get(ev.item_id)
            if lst is None:
                by_item[ev.item_id] = [ev]
            else:
                lst.append(ev)
        asked = _by_stored_id(by_item)
        ikeys = list(by_key)
        ikeys += [k for k in asked if k not in by_key]
        raws = self._get_many([ITEM + k for k in ikeys])
        as_of_each = logic.counter_as_of_each
        for key, raw in zip(ikeys, raws):
            item = decode(ItemRecord, raw)
            queried = asked.get(key)  # queries come only with ``at``
            if queried is not None:  # as stored, before this batch's rows change them
                times = [ev.ts for ev in queried]
                stored = (as_of_each(item.impressions, times), as_of_each(item.clicks, times))
            evs = by_key.get(key)
            clicks, imps, feats = [], [], None  # this batch's rows, in time order
            if evs is not None:
                if len(evs) > 1:
                    evs.sort(key=_first)  # stable: equal times keep arrival order
                # logic.update_item inlined (one call per event was a tenth of the append time).
                f_ts, category = item.features_ts, item.category_id
                for ts, is_click, cat, features in evs:
                    if is_click is True:
                        clicks.append(ts)
                    elif is_click is False:
                        imps.append(ts)
                    if ts >= f_ts:
                        f_ts = ts
                        if cat is not None:
                            category = cat
                        if features:
                            feats = features
                    elif category is None:
                        category = cat
                item.features_ts, item.category_id = f_ts, category
            if queried is not None:  # plus this batch's rows strictly before each time
                for ev, n_imps, n_clicks in zip(queried, *stored):
                    t = ev.ts
                    c = at[id(ev)]
                    c["item_impressions"] = n_imps + bisect_left(imps, t)
                    c["item_clicks"] = n_clicks + bisect_left(clicks, t)
            if evs is None:
                continue  # only asked about: nothing to write
            last = last_active(raw) if raw is not None else -1
            if feats is not None:
                item.features = dict(feats)
            if clicks:
                logic.counter_extend(item.clicks, clicks, points)
            if imps:
                logic.counter_extend(item.impressions, imps, points)
            if evs[-1][0] > last:
                last = evs[-1][0]
            records.append((ITEM + key, encode(item, last)))

    def rebuild_from(self, events: Iterable[Impression | Click], batch_size: int = 10_000) -> dict[str, int]:
        """Apply an event log (e.g. a partition's input topics replayed from the beginning) in
        batches. Idempotency makes this correct on an empty store and harmless on a full one."""
        totals: dict[str, int] = {}
        batch: list = []

        def flush() -> None:
            for k, v in self.apply(batch).items():
                totals[k] = totals.get(k, 0) + v
            batch.clear()

        for ev in events:
            batch.append(ev)
            if len(batch) >= batch_size:
                flush()
        flush()
        return totals

    # -- offsets and caller state -------------------------------------------------------------
    def committed_offsets(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): next offset to consume} as of the last applied batch."""
        return {offset_from_key(k): unpack_int(v) for k, v in self._scan(OFFSET)}

    def iter_extra(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """The caller's keys (as given to ``apply(extra_changes=)``) starting with ``prefix``, in key order."""
        n = len(EXTRA)
        for k, v in self._scan(EXTRA + prefix):
            yield k[n:], v

    def get_extra(self, key: bytes) -> bytes | None:
        return self._db.get(EXTRA + key)

    def _scan(self, prefix: bytes, keys_only: bool = False) -> Iterator[tuple[bytes, bytes | None]]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            yield k, (None if keys_only else it.value())
            it.next()

    # -- reads ------------------------------------------------------------------------------
    def _user(self, user_id: Any) -> UserRecord | None:
        raw = self._get_many([USER + id_bytes(user_id)])[0]
        return None if raw is None else decode(UserRecord, raw)

    def get_sequence(self, user_id: Any, as_of: int | None = None, limit: int | None = None) -> list[Behaviour]:
        """The user's newest ``limit`` (default ``seq_len``) behaviours strictly before
        ``as_of`` (all kept ones when None), oldest first."""
        user = self._user(user_id)
        if user is None:
            return []
        end = logic.sequence_before(user, as_of)
        start = max(0, end - (limit or self.seq_len))
        ts, items, cats = array("q", user.ts), unpack_ids(user.items), unpack_ids(user.cats)
        return [Behaviour(items[j], cats[j], BEHAVIOR_NAMES[user.behaviors[j]], ts[j])
                for j in range(start, end)]

    def histories_many(self, user_ids: list, as_of: list[int], limit: int | None = None) -> list[tuple]:
        """:meth:`get_sequence` for many (user, time) pairs in one multi-get, column-wise: per pair
        ``(item ids, category ids, behaviour names, timestamps)``, oldest first, strictly before
        its time. Each distinct user's record is decoded once, however many pairs name it."""
        keys = id_keys(USER, user_ids)
        distinct = list(dict.fromkeys(keys))
        raws = dict(zip(distinct, self._get_many(distinct)))
        return history_columns(keys, raws, as_of, limit or self.seq_len)

    def multi_get(self, user_ids: list, as_of: Any = None, T: int | None = None) -> SequenceBatch:
        """Sequences of many users as fixed-shape arrays for the model (one RocksDB multi-get).

        ``as_of``: None, one event time for all, or one per user (array-like): only behaviours
        strictly before it. Left-padded, most recent at index ``T-1`` (see :class:`SequenceBatch`)."""
        raws = self._get_many(id_keys(USER, user_ids))
        return fill_sequences(user_ids, raws, as_of, T or self.seq_len)

    def counters_as_of(self, user_id: Any, item_id: Any, as_of: int | None) -> dict[str, float]:
        """Point-in-time counters: events strictly before ``as_of``. Keys: ``user_impressions``,
        ``user_clicks``, ``item_impressions``, ``item_clicks``. Item counters are this
        partition's view (events of the users this partition holds)."""
        raw_user, raw_item = self._get_many([USER + id_bytes(user_id), ITEM + id_bytes(item_id)])
        return counters_dict(raw_user, raw_item, as_of)

    def counters_many(self, user_ids: list, item_ids: list, as_of: Any) -> list[dict[str, float]]:
        """:meth:`counters_as_of` for many (user, item) pairs in one multi-get; ``as_of`` is one
        time or one per pair."""
        n = len(user_ids)
        raws = self._get_many(id_keys(USER, user_ids) + id_keys(ITEM, item_ids))
        times = as_of if hasattr(as_of, "__len__") else [as_of] * n
        return [counters_dict(raws[j], raws[n + j], None if times[j] is None else int(times[j])) for j in range(n)]

    def has_user(self, user_id: Any) -> bool:
        return self._get_many([USER + id_bytes(user_id)])[0] is not None

    def user_counters(self, user_id: Any, as_of: int | None = None) -> dict[str, float]:
        """``user_impressions`` and ``user_clicks`` strictly before ``as_of``."""
        out = counters_dict(self._get_many([USER + id_bytes(user_id)])[0], None, as_of)
        return {k: v for k, v in out.items() if k.startswith("user_")}

    def user_profile(self, user_id: Any) -> dict[str, Any] | None:
        user = self._user(user_id)
        return None if user is None else user.profile

    def item_features(self, item_id: Any) -> dict[str, Any] | None:
        """Latest-known ``{"category_id": ..., **side features}`` of an item, or None."""
        raw = self._get_many([ITEM + id_bytes(item_id)])[0]
        if raw is None:
            return None
        item = decode(ItemRecord, raw)
        return {"category_id": item.category_id, **(item.features or {})}

    def user_ids(self) -> Iterator[Any]:
        """Every user id in this partition (key order)."""
        n = len(USER)
        for k, _ in self._scan(USER, keys_only=True):
            yield id_from_bytes(k[n:])

    # -- retention, size, snapshots -----------------------------------------------------------
    def sweep(self, now_ms: int, retention_days: float | None = None) -> dict[str, int]:
        """Drop users and items with no event in the last ``retention_days`` of EVENT time
        before ``now_ms`` (pass the stream's watermark, not the wall clock, when replaying)."""
        days = self.settings.retention_days if retention_days is None else retention_days
        cutoff = now_ms - int(days * 86_400_000)
        dropped = {"users": 0, "items": 0}
        wb = WriteBatch(raw_mode=True)
        gone: list[bytes] = []
        for k, v in self._scan(USER):
            if last_active(v) < cutoff:
                wb.delete(k)
                wb.delete(DEDUPE + k[len(USER):])
                gone += (k, DEDUPE + k[len(USER):])
                dropped["users"] += 1
        for k, v in self._scan(ITEM):
            if last_active(v) < cutoff:
                wb.delete(k)
                gone.append(k)
                dropped["items"] += 1
        wb.put(META + b"last_sweep_cutoff", pack_int(cutoff))
        self._db.write(wb, self._write_opt)
        self._cache.discard(gone)
        return dropped

    def stats(self, exact: bool = True) -> dict[str, Any]:
        """Size of the store: users, items, keys (exact counts scan the keys; otherwise
        RocksDB's estimate), bytes on disk (every file of the directory), memtable bytes."""
        out: dict[str, Any] = {"path": str(self.path)}
        if exact:
            counts = {USER: 0, ITEM: 0}
            keys = 0
            for k, _ in self._scan(b"", keys_only=True):
                keys += 1
                p = k[:2]
                if p in counts:
                    counts[p] += 1
            out.update(users=counts[USER], items=counts[ITEM], keys=keys)
        else:
            out["keys"] = self._db.property_int_value("rocksdb.estimate-num-keys")
        out["bytes_on_disk"] = directory_bytes(self.path)
        out["sst_bytes"] = self._db.property_int_value("rocksdb.total-sst-files-size")
        out["memtable_bytes"] = self._db.property_int_value("rocksdb.cur-size-all-mem-tables")
        return out

    def cache_stats(self) -> dict[str, int]:
        """The record cache's entries, bytes, bound, and hits/misses since opening."""
        return self._cache.stats()

    def checkpoint(self, target: str | os.PathLike) -> Path:
        """A consistent copy of the store in ``target`` (must not exist): hard links to the
        immutable files, so it is fast and small. Open it with :class:`PartitionStore` or
        :meth:`restore` it into a worker's directory."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        Checkpoint(self._db).create_checkpoint(str(target))
        return target

    @staticmethod
    def restore(checkpoint_dir: str | os.PathLike, path: str | os.PathLike) -> None:
        """Install a checkpoint as the store at ``path`` (replacing what is there)."""
        path = Path(path)
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(checkpoint_dir, path)

    def snapshot_items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key/value of one consistent point in time (a compacted changelog of this
        partition: ship it anywhere and :meth:`load_items` it into an empty store)."""
        snap = self._db.snapshot()
        try:
            it = snap.iter()
            it.seek_to_first()
            while it.valid():
                yield it.key(), it.value()
                it.next()
        finally:
            del snap

    def load_items(self, items: Iterable[tuple[bytes, bytes]], batch_size: int = 10_000) -> int:
        """Write key/values from :meth:`snapshot_items` (one WriteBatch per ``batch_size``)."""
        n = 0
        wb = WriteBatch(raw_mode=True)
        for k, v in items:
            wb.put(k, v)
            n += 1
            if n % batch_size == 0:
                self._db.write(wb, self._write_opt)
                self._cache.clear()  # rare bulk load: simpler than tracking the keys
                wb = WriteBatch(raw_mode=True)
        if not wb.is_empty():
            self._db.write(wb, self._write_opt)
        self._cache.clear()
        return n


_first = itemgetter(0)  # a C key function: sorting calls it once per event


def _by_stored_id(by_raw_id: dict[Any, list]) -> dict[bytes, list]:
    """Lists grouped by raw item id, regrouped by stored id (``id_bytes`` once per distinct id;
    ids such as 1 and True that are stored alike are merged)."""
    out: dict[bytes, list] = {}
    for raw_id, rows in by_raw_id.items():
        key = id_bytes(raw_id)
        if key in out:
            out[key].extend(rows)
        else:
            out[key] = rows
    return out


def _group_by_user(events: Iterable, out: logic.Outcome) -> dict[bytes, list]:
    """Valid events grouped by user key (arrival order kept within a user); the rest rejected.

    Grouping by the raw id first means one ``id_bytes`` per distinct user, not per event."""
    by_id: dict[Any, list] = {}
    codes = BEHAVIOR_CODES
    for ev in events:
        t = type(ev)
        if (t is not Click and t is not Impression) or (t is Click and ev.behavior not in codes):
            out.rejected += 1
            continue
        uid = ev.user_id
        try:
            group = by_id.get(uid)
        except TypeError:  # unhashable: not an id
            out.rejected += 1
            continue
        if group is None:
            by_id[uid] = [ev]
        else:
            group.append(ev)
    by_user: dict[bytes, list] = {}
    for uid, group in by_id.items():
        try:
            uk = id_bytes(uid)
        except (TypeError, ValueError, OverflowError):
            out.rejected += len(group)
            continue
        if uk in by_user:  # e.g. 1 and True: the same stored id
            by_user[uk].extend(group)
        else:
            by_user[uk] = group
    return by_user


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass  # a file removed by compaction meanwhile
    return total
