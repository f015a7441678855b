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
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

from rocksdict import (AccessType, BlockBasedOptions, Cache, Checkpoint, DBCompressionType, Options,
                       Rdict, WriteBatch, WriteOptions)

from dmrstream.contracts import Click, Impression
from dmrstream.settings import FeatureSettings, Settings
from featurestore import logic
from featurestore.codec import (BEHAVIOR_CODES, BEHAVIOR_NAMES, DEDUPE, EXTRA, ITEM, META, OFFSET, USER,
                                DedupeRecord, ItemRecord, UserRecord, decode, encode, event_hash, id_bytes,
                                id_from_bytes, last_active, offset_from_key, offset_key, pack_int, unpack_ids, unpack_int)
from featurestore.reads import SequenceBatch, counters_dict, fill_sequences

_BY_TS = attrgetter("ts")


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
    """

    def __init__(self, path: str | os.PathLike, settings: Settings | FeatureSettings | None = None, *,
                 read_only: bool = False, cache: Cache | None = None):
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
              extra_puts: Mapping[bytes, bytes] | None = None, extra_deletes: Iterable[bytes] | None = None
              ) -> dict[str, int]:
        """Apply behaviour events (``Click``: click/cart/fav/buy) and impressions, and record
        ``offsets`` ({(topic, partition): next offset}) and the caller's ``extra_puts`` /
        ``extra_deletes`` (its own keys, stored under a reserved prefix), all in one atomic
        write. Events already applied change nothing. Returns tallies: behaviours, impressions
        (newly applied), duplicates, too_old, rejected (not an event this store understands)."""
        out = logic.Outcome()
        by_user: dict[bytes, list] = {}
        for ev in events:
            t = type(ev)
            if (t is not Click and t is not Impression) or (t is Click and ev.behavior not in BEHAVIOR_CODES):
                out.rejected += 1
                continue
            try:
                uk = id_bytes(ev.user_id)
            except (TypeError, ValueError, OverflowError):
                out.rejected += 1
                continue
            group = by_user.get(uk)
            if group is None:
                by_user[uk] = [ev]
            else:
                group.append(ev)

        wb = WriteBatch(raw_mode=True)
        if by_user:
            self._apply_users(by_user, wb, out)
        for (topic, partition), offset in (offsets or {}).items():
            wb.put(offset_key(topic, partition), pack_int(offset))
        for key, value in (extra_puts or {}).items():
            wb.put(EXTRA + key, bytes(value))
        for key in extra_deletes or ():
            wb.delete(EXTRA + key)
        if not wb.is_empty():
            self._db.write(wb, self._write_opt)
        return out.as_dict()

    def _apply_users(self, by_user: dict[bytes, list], wb: WriteBatch, out: logic.Outcome) -> None:
        keep, points, dedupe_n = self.keep, self.settings.counter_points, self.settings.dedupe_ids_per_user
        ukeys = list(by_user)
        n = len(ukeys)
        raws = self._db.get([USER + k for k in ukeys] + [DEDUPE + k for k in ukeys])
        # item key -> [(ts, is_click, category, features)] of the accepted events
        item_events: dict[bytes, list] = {}
        counter_add = logic.counter_add
        for i, uk in enumerate(ukeys):
            raw_user = raws[i]
            user = decode(UserRecord, raw_user)
            dd = decode(DedupeRecord, raws[n + i])
            last = last_active(raw_user) if raw_user is not None else -1
            evs = by_user[uk]
            evs.sort(key=_BY_TS)
            behaviours, imps = [], []
            for ev in evs:
                if type(ev) is Click:
                    behaviours.append((ev.ts, event_hash(ev.event_id), ev.item_id, ev.category_id,
                                       BEHAVIOR_CODES[ev.behavior]))
                else:
                    imps.append(ev)
            clicked, accepted = [], ()
            if behaviours:
                accepted = logic.merge_behaviours(user, dd, behaviours, keep, out)
                out.behaviours += len(accepted)
                for ts, _, item, cat, code in accepted:
                    if code == 1:
                        clicked.append((ts, item, cat))
                    else:
                        _item_event(item_events, item, ts, None, cat, None)
                    if ts > last:
                        last = ts
            new_imps = []
            if imps:
                blob, ts_blob = bytearray(dd.imp_hashes), array("q", dd.imp_ts)
                for ev in imps:
                    if logic.accept_impression(dd, blob, ts_blob, event_hash(ev.event_id), ev.ts, out):
                        new_imps.append(ev)
                logic.trim_impressions(dd, blob, ts_blob, dedupe_n)
                out.impressions += len(new_imps)
            # Counters in event-time order (imps is sorted; clicks come sorted by (ts, hash)).
            for ts, item, cat in clicked:
                counter_add(user.clicks, ts, points)
                _item_event(item_events, item, ts, True, cat, None)
            for ev in new_imps:
                ts = ev.ts
                counter_add(user.impressions, ts, points)
                _item_event(item_events, ev.item_id, ts, False, ev.category_id, ev.item_features)
                if ev.user_profile and ts >= user.profile_ts:
                    user.profile, user.profile_ts = dict(ev.user_profile), ts
                if ts > last:
                    last = ts
            if accepted or new_imps:  # an all-duplicate batch writes nothing
                wb.put(USER + uk, encode(user, last))
                wb.put(DEDUPE + uk, encode(dd, last))
        if item_events:
            self._apply_items(item_events, wb, points)

    def _apply_items(self, item_events: dict[bytes, list], wb: WriteBatch, points: int) -> None:
        ikeys = list(item_events)
        raws = self._db.get([ITEM + k for k in ikeys])
        for key, raw in zip(ikeys, raws):
            item = decode(ItemRecord, raw)
            last = last_active(raw) if raw is not None else -1
            evs = item_events[key]
            evs.sort(key=_first)
            for ts, is_click, cat, features in evs:
                if is_click is True:
                    logic.counter_add(item.clicks, ts, points)
                elif is_click is False:
                    logic.counter_add(item.impressions, ts, points)
                logic.update_item(item, ts, cat, features)
                if ts > last:
                    last = ts
            wb.put(ITEM + key, encode(item, last))

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
        """The caller's keys (as given to ``extra_puts``) starting with ``prefix``, in key order."""
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
        raw = self._db.get(USER + id_bytes(user_id))
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

    def multi_get(self, user_ids: list, as_of: Any = None, T: int | None = None) -> SequenceBatch:
        """Sequences of many users as fixed-shape arrays for the model (one RocksDB multi-get).

        ``as_of``: None, one event time for all, or one per user (array-like): only behaviours
        strictly before it. Left-padded, most recent at index ``T-1`` (see :class:`SequenceBatch`)."""
        raws = self._db.get([USER + id_bytes(u) for u in user_ids])
        return fill_sequences(user_ids, raws, as_of, T or self.seq_len)

    def counters_as_of(self, user_id: Any, item_id: Any, as_of: int | None) -> dict[str, float]:
        """Point-in-time counters: events strictly before ``as_of``. Keys: ``user_impressions``,
        ``user_clicks``, ``item_impressions``, ``item_clicks``. Item counters are this
        partition's view (events of the users this partition holds)."""
        raw_user, raw_item = self._db.get([USER + id_bytes(user_id), ITEM + id_bytes(item_id)])
        return counters_dict(raw_user, raw_item, as_of)

    def counters_many(self, user_ids: list, item_ids: list, as_of: Any) -> list[dict[str, float]]:
        """:meth:`counters_as_of` for many (user, item) pairs in one multi-get; ``as_of`` is one
        time or one per pair."""
        n = len(user_ids)
        raws = self._db.get([USER + id_bytes(u) for u in user_ids] + [ITEM + id_bytes(i) for i in item_ids])
        times = as_of if hasattr(as_of, "__len__") else [as_of] * n
        return [counters_dict(raws[j], raws[n + j], None if times[j] is None else int(times[j])) for j in range(n)]

    def has_user(self, user_id: Any) -> bool:
        return self._db.get(USER + id_bytes(user_id)) is not None

    def user_counters(self, user_id: Any, as_of: int | None = None) -> dict[str, float]:
        """``user_impressions`` and ``user_clicks`` strictly before ``as_of``."""
        out = counters_dict(self._db.get(USER + id_bytes(user_id)), None, as_of)
        return {k: v for k, v in out.items() if k.startswith("user_")}

    def user_profile(self, user_id: Any) -> dict[str, Any] | None:
        user = self._user(user_id)
        return None if user is None else user.profile

    def item_features(self, item_id: Any) -> dict[str, Any] | None:
        """Latest-known ``{"category_id": ..., **side features}`` of an item, or None."""
        raw = self._db.get(ITEM + id_bytes(item_id))
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
        for k, v in self._scan(USER):
            if last_active(v) < cutoff:
                wb.delete(k)
                wb.delete(DEDUPE + k[len(USER):])
                dropped["users"] += 1
        for k, v in self._scan(ITEM):
            if last_active(v) < cutoff:
                wb.delete(k)
                dropped["items"] += 1
        wb.put(META + b"last_sweep_cutoff", pack_int(cutoff))
        self._db.write(wb, self._write_opt)
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
                wb = WriteBatch(raw_mode=True)
        if not wb.is_empty():
            self._db.write(wb, self._write_opt)
        return n


def _first(row: tuple) -> int:
    return row[0]


def _item_event(item_events: dict, item: Any, ts: int, is_click: bool | None, cat: Any, features: Any) -> None:
    key = id_bytes(item)
    row = (ts, is_click, cat, features)
    lst = item_events.get(key)
    if lst is None:
        item_events[key] = [row]
    else:
        lst.append(row)


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
