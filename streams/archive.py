"""The event archive: what the workers committed, drained from Redis into Parquet files by hour.

Layout under ``PRIVADS_DATA/archive`` (a directory, or a prefix of an S3 bucket: ``infra.objects``)::

    impressions/hour=2026-11-23T14/p{partition}-{first entry id}.parquet   one row per impression (raw JSON kept,
                                                                          and the user as served: user_mean/_count)
    labels/hour=2026-11-23T14/p{partition}-{first entry id}.parquet        one row per clicked impression

An archived impression is a positive if it has a label row, and a negative once
its attribution window has passed without one: the workers label exactly so,
and writing the (many) negatives out would double the archive for nothing.

Exactly once: each batch's archive entry is written to the stream ``arch:{p}``
in the same Redis transaction as the state it describes. A drain reads a chunk
of entries, writes every file of the chunk (named by the chunk's first entry
id, each under a temporary name; once all are written, each is renamed into
place; on S3 each object is PUT whole), and only then trims the stream. A crash before the trim re-reads a chunk
that starts at the same id and rewrites the same file names, so no row is
archived twice or lost.

A drain that cannot write (a full disk: ``ENOSPC``) removes the temporary files
it wrote, renames none, and trims nothing: readers never see a partial file or
part of a chunk, and the entries wait in Redis. The workers drain through a
``Drainer``, which logs such a failure once, backs off, and retries until the
disk has room again (``tests/streams/test_disk_full.py``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec
import numpy as np
import pyarrow as pa

from privads.infra import keys, progress
from privads.infra.objects import Objects, as_objects, table_bytes
from privads.infra.records import Impression, Labelled, erased_event

if TYPE_CHECKING:  # for annotations only: reading the archive (learner.logs) does without redis
    import redis

    from privads.infra.store import StreamEntries

IMPRESSION_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", pa.float64()), ("user_id", pa.string()), ("ad_id", pa.string()),
    ("position", pa.int32()), ("propensity", pa.float64()), ("policy", pa.string()),
    ("model_version", pa.string()), ("request_id", pa.string()), ("raw", pa.string()),
    # the user as the ranker saw it at serving (records.pack_served; null in files written before it was logged)
    ("user_mean", pa.string()), ("user_count", pa.int64()),
])
LABEL_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("user_id", pa.string()), ("ad_id", pa.string()), ("ts", pa.float64()),
    ("clicked", pa.int8()), ("value", pa.float64()), ("policy", pa.string()),
])
_labels = msgspec.msgpack.Decoder(list[Labelled])
log = logging.getLogger(__name__)


HOUR_S = 3600


def hour_of(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(ts))


# the archive's root: ``Objects`` (a directory or an S3 prefix), or a directory's path
Root = Objects | Path


def _write_all(root: Objects, files: list[tuple[str, pa.Table]]) -> None:
    """Write each table as a Parquet file at its key, all or none (``Objects.put_all``).

    A failure while writing (a full disk) removes what was written, so a reader sees every file of
    the set or none of them, never a partial one.
    """
    root.put_all((key, table_bytes(table)) for key, table in files)


_impression = msgspec.json.Decoder(Impression)


def columns_of(entries: StreamEntries) -> tuple[dict[str, list], dict[str, list]]:
    """Impression and label columns of a chunk of archive entries (column-wise: this runs per event)."""
    lines = [ln for _, f in entries for ln in f.get(b"imp", b"").split(b"\n") if ln]
    imps = [_impression.decode(ln) for ln in lines]
    labs = [lab for _, f in entries if f.get(b"lab") for lab in _labels.decode(f[b"lab"])]
    imp_cols: dict[str, list] = {
        "event_id": [i.event_id for i in imps], "ts": [i.ts for i in imps], "user_id": [i.user_id for i in imps],
        "ad_id": [i.ad_id for i in imps], "position": [i.position for i in imps],
        "propensity": [i.propensity for i in imps], "policy": [i.policy for i in imps],
        "model_version": [i.model_version for i in imps], "request_id": [i.request_id for i in imps],
        "raw": [ln.decode() for ln in lines],
        "user_mean": [i.user_mean for i in imps], "user_count": [i.user_count for i in imps],
    }
    lab_cols: dict[str, list] = {
        "impression_id": [x.impression_id for x in labs], "user_id": [x.user_id for x in labs],
        "ad_id": [x.ad_id for x in labs], "ts": [x.ts for x in labs], "clicked": [int(x.clicked) for x in labs],
        "value": [x.value for x in labs], "policy": [x.policy for x in labs],
    }
    return imp_cols, lab_cols


def _without(cols: dict[str, list], erased: Mapping[str, float]) -> dict[str, list]:
    """The columns without the rows of erased users from before their erasure."""
    drop = [erased_event(erased, u, t) for u, t in zip(cols["user_id"], cols["ts"], strict=True)]
    if not any(drop):
        return cols
    return {name: [v for v, d in zip(values, drop, strict=True) if not d] for name, values in cols.items()}


def write_chunk(root: Root, partition: int, first_id: str, entries: StreamEntries) -> int:
    """Write a chunk's rows into hour files named by ``first_id``; returns the number of rows."""
    imp_cols, lab_cols = columns_of(entries)
    return write_columns(root, partition, first_id, imp_cols, lab_cols)


def write_columns(root: Root, partition: int, first_id: str, imp_cols: dict[str, list],
                  lab_cols: dict[str, list]) -> int:
    """Write ``columns_of``'s columns into hour files named by ``first_id``; returns the number of rows."""
    name = f"p{partition}-{first_id}.parquet"
    rows = 0
    files: list[tuple[str, pa.Table]] = []
    for kind, cols, schema in (("impressions", imp_cols, IMPRESSION_SCHEMA), ("labels", lab_cols, LABEL_SCHEMA)):
        if not cols["ts"]:
            continue
        table = pa.table(cols, schema=schema)
        rows += table.num_rows
        hours = (np.asarray(cols["ts"]) // HOUR_S).astype(np.int64)
        for h in np.unique(hours):
            part = table if len(hours) and (hours == h).all() else table.filter(pa.array(hours == h))
            files.append((f"{kind}/hour={hour_of(float(h) * HOUR_S)}/{name}", part))
    # the chunk's files all at once: a reader never sees its impressions without its labels
    _write_all(as_objects(root), files)
    return rows


def drain(r: redis.Redis | redis.RedisCluster, root: Root, partition: int, chunk: int = 500,
          still_mine: Callable[[], bool] | None = None, upto: str = "+") -> int:
    """Move archived entries of one partition from Redis into Parquet; returns rows written.

    ``r`` is a synchronous redis client (the drain runs in a thread). ``still_mine``, asked before
    each chunk, renews the caller's lock on the partition's drain; the drain stops when it says no.
    Only entries up to id ``upto`` are drained: on a cluster, the ones a replica is known to hold
    (``infra.store.Committed``).
    """
    stream = keys.archive(partition)
    written = 0
    while still_mine is None or still_mine():
        # bytes: the client leaves decode_responses off (see infra.store)
        entries = cast("StreamEntries | None", r.xrange(stream, "-", upto, count=chunk))
        if not entries:
            return written
        first, last = entries[0][0].decode(), entries[-1][0].decode()
        imp_cols, lab_cols = columns_of(entries)
        # a user erased while the chunk waited in Redis is not written (a batch committed after the erasure left the
        # user's rows out itself, streams.worker); the erasure stays pending until this chunk is trimmed
        erased = _erased_in(r, partition, imp_cols["user_id"] + lab_cols["user_id"])
        if erased:
            imp_cols, lab_cols = _without(imp_cols, erased), _without(lab_cols, erased)
        written += write_columns(root, partition, first.replace("-", "_"), imp_cols, lab_cols)
        # only now: everything up to `last` is on disk. Exactly: an approximate (~) trim keeps whole stream nodes,
        # whose entries the next drain would then write a second time under another file name
        r.xtrim(stream, minid=keys.entry_after(last), approximate=False)
        if len(entries) < chunk:
            return written
    return written


class Drainer:
    """Drains a worker's partitions into the archive, and rides out a drain that fails.

    A failed drain (a full or read-only disk, Redis away or full) has trimmed nothing it did not
    write (``drain``), so its entries wait in ``arch:{p}``. The first failure is logged once, with
    what happens next; the following attempts back off, from one period to ``MAX_BACKOFF_PERIODS``
    periods (a minute at the default ``ARCHIVE_EVERY_S``), and log nothing until one succeeds,
    which is logged once too. Meanwhile the API's ``privads_archive_oldest_pending_seconds`` grows.

    Parameters
    ----------
    root : Objects or Path
        The archive (``PRIVADS_DATA/archive``: ``infra.objects.archive_of``).
    every_s : float
        The drain period (``ARCHIVE_EVERY_S``).
    owner : str
        Written in the per-partition lock ``archlock:{p}``, which keeps two workers (during a
        rebalance) from draining one partition at once.
    """

    MAX_BACKOFF_PERIODS = 12
    # renewed before each chunk of a drain: a worker killed mid-drain holds its partition's archive this long at most
    LOCK_S = 20
    TMP_AGE_S = 300  # a temporary file this old is no live writer's

    def __init__(self, root: Root, every_s: float, owner: str) -> None:
        self.root = as_objects(root)
        self.every_s = every_s
        self.owner = owner
        self.failures = 0  # failed attempts in a row
        self.failing_since: float | None = None
        self.error: str | None = None  # the last failure, while failing
        self._reported: tuple[str, int | None] | None = None
        self._retry_at = 0.0
        self._swept = False

    def run(self, r: redis.Redis | redis.RedisCluster, partitions: Iterable[int], force: bool = False,
            upto: Mapping[int, str] | None = None) -> int:
        """Drain the partitions whose lock this worker gets; returns rows written.

        While backing off it does nothing (0) unless ``force`` (the last drain before the worker stops).
        With ``upto`` (a cluster), each partition is drained up to the entry id it gives, and not at all if absent.
        """
        if upto is not None:
            partitions = [p for p in partitions if p in upto]
        if not force and time.monotonic() < self._retry_at:
            return 0
        if not self._swept:
            self._swept = True
            self._sweep()
        written = 0
        try:
            for p in partitions:
                lock = f"archlock:{p}"
                # or it is this drainer's own: a Redis restored from before its release (an AOF that lost its last
                # second) brings a lock back that nobody else holds; waiting out its TTL would stall the archive
                if r.set(lock, self.owner, nx=True, ex=self.LOCK_S) or r.get(lock) == self.owner.encode():
                    try:
                        written += drain(r, self.root, p, still_mine=functools.partial(self._renew, r, lock),
                                         upto="+" if upto is None else upto[p])
                    finally:
                        if r.get(lock) == self.owner.encode():  # not another drainer's, taken after ours expired
                            r.delete(lock)
        except Exception as e:  # noqa: BLE001 - a drain that fails waits for the next attempt; nothing is lost
            self._failed(e)
            return written
        if self.failures:
            log.warning("archive: drained again into %s after %d failed attempts over %.0f s", self.root,
                        self.failures, time.monotonic() - (self.failing_since or time.monotonic()))
        self.failures, self.failing_since, self.error, self._reported, self._retry_at = 0, None, None, None, 0.0
        return written

    def _renew(self, r: redis.Redis | redis.RedisCluster, lock: str) -> bool:
        """Extend this drainer's lock for another ``LOCK_S``; False if it expired and is not ours any more."""
        if r.get(lock) != self.owner.encode():
            log.warning("archive: the drain lock %s expired during a drain (a chunk took over %d s); stopping, the "
                        "next holder goes on", lock, self.LOCK_S)
            return False
        r.expire(lock, self.LOCK_S)
        return True

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.error = f"{type(e).__name__}: {e}"
        backoff = self.every_s * min(2 ** (self.failures - 1), self.MAX_BACKOFF_PERIODS)
        self._retry_at = time.monotonic() + backoff
        kind = (type(e).__name__, getattr(e, "errno", None))
        if kind != self._reported:  # once per kind of failure, not per attempt
            self._reported = kind
            log.error("archive: cannot drain into %s (%s); the committed batches wait in Redis (the arch:* streams) "
                      "and are retried, backing off to every %.0f s; nothing more is logged until it works again",
                      self.root, self.error, self.every_s * self.MAX_BACKOFF_PERIODS)

    def _sweep(self) -> None:
        """Remove temporary files a killed writer left (older than ``TMP_AGE_S``: no live writer's; on S3 a PUT
        leaves none)."""
        local = self.root.local_path()
        if local is None:
            return
        old = time.time() - self.TMP_AGE_S
        for tmp in local.glob("*/hour=*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < old:
                    tmp.unlink()
            except OSError:
                continue


def _erased_in(r: redis.Redis | redis.RedisCluster, partition: int, user_ids: list[str]) -> dict[str, float]:
    """The ones of ``user_ids`` (of partition ``partition``) whose erasure is pending (``keys.erasures``), with when.

    Only pending erasures matter here: an erasure is settled only once every chunk
    committed before it has been drained (``learner.erasure``), and a chunk committed
    after it holds none of the user's rows. Usually none is pending, and the chunk's
    users are not even hashed.
    """
    pending = cast(list[tuple[bytes, float]], r.zrange(keys.erasures(partition), 0, -1, withscores=True))
    if not pending:
        return {}
    by_hash = {h.decode(): float(t) for h, t in pending}
    return {u: by_hash[h] for u in dict.fromkeys(user_ids) if (h := keys.user_hash(u)) in by_hash}


def _schema(kind: str) -> pa.Schema:
    return IMPRESSION_SCHEMA if kind == "impressions" else LABEL_SCHEMA


def _first_entry_ms(key: str) -> int:
    """When a file's chunk was committed: the Redis entry id in its name (``p{p}-{ms}_{seq}.parquet``)."""
    try:
        return int(key.rsplit("/", 1)[-1].split("-", 1)[1].split("_", 1)[0])
    except (IndexError, ValueError):
        return 0


def _parquet(root: Objects, prefix: str) -> list[str]:
    """The Parquet files below ``prefix`` (not the temporary ones a writer has not renamed yet)."""
    return [k for k in root.files(prefix) if k.endswith(".parquet") and not k.rsplit("/", 1)[-1].startswith(".")]


def _hours_newest_first(root: Objects, kind: str, since: float | None) -> list[str]:
    """The hour directories of ``kind`` (their keys) from the hour of ``since`` on (all without it), newest first."""
    first = None if since is None else f"hour={hour_of(since)}"
    return [f"{kind}/{d}" for d in sorted(root.dirs(kind), reverse=True)
            if d.startswith("hour=") and (first is None or d >= first)]


def newest_ts(root: Root, kind: str = "impressions") -> float | None:
    """The newest row's ``ts``, from the newest hour's Parquet statistics (no row is read)."""
    root = as_objects(root)
    for hour in _hours_newest_first(root, kind, None):
        best = None
        for f in _parquet(root, hour):
            meta = root.parquet_metadata(f)
            col = meta.schema.to_arrow_schema().get_field_index("ts")
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(col).statistics
                if stats is not None and stats.has_min_max:
                    best = stats.max if best is None else max(best, stats.max)
        if best is not None:
            return float(best)
    return None


def read_recent(root: Root, kind: str, *, since: float | None = None, until: float | None = None,
                limit: int | None = None, columns: list[str] | None = None) -> pa.Table:
    """The newest rows of ``kind`` with ``since ≤ ts ≤ until``, at most ``limit`` of them.

    Only the hour directories from ``since`` on are listed (the archive is partitioned
    by hour), and their files are read newest first (by the commit time in their names)
    until ``limit`` rows are held: memory is ``limit`` rows plus one file, whatever the
    archive's size. Rows are then ordered by ``ts`` and the newest ``limit`` kept.
    """
    root = as_objects(root)
    schema = _schema(kind)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in dict.fromkeys([*columns, "ts"])])
    tables, held = [], 0
    for hour in _hours_newest_first(root, kind, since):
        for f in sorted(_parquet(root, hour), key=_first_entry_ms, reverse=True):
            t = root.read_table(f, schema=schema)
            ts = t.column("ts").to_numpy()
            keep = np.ones(ts.shape[0], bool)
            if since is not None:
                keep &= ts >= since
            if until is not None:
                keep &= ts <= until
            if not keep.all():
                t = t.filter(pa.array(keep))
            if t.num_rows:
                tables.append(t)
                held += t.num_rows
            if limit is not None and held >= limit:
                break
        if limit is not None and held >= limit:
            break
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    order = np.argsort(table.column("ts").to_numpy(), kind="stable")
    if limit is not None:
        order = order[-limit:]
    return table.take(pa.array(order))


def read_table(root: Root, kind: str) -> pa.Table:
    """Every archived row of ``kind`` ("impressions" or "labels") as one table."""
    root = as_objects(root)
    files = [f for f in _parquet(root, kind) if f.split("/")[1].startswith("hour=")]
    schema = IMPRESSION_SCHEMA if kind == "impressions" else LABEL_SCHEMA
    if not files:
        return schema.empty_table()
    with progress.bar(f"reading the archive's {kind}", total=len(files), unit="file") as bar:
        tables = []
        for f in files:
            tables.append(root.read_table(f, schema=schema))
            bar.update(1)
    return pa.concat_tables(tables)


def prune(root: Root, before: float) -> int:
    """Remove the archive's hour directories (both kinds) wholly older than ``before``; returns how many."""
    root = as_objects(root)
    first_kept = f"hour={hour_of(before)}"
    gone = 0
    for kind in ("impressions", "labels"):
        for hour in root.dirs(kind):
            if not hour.startswith("hour="):
                continue
            if hour >= first_kept:
                break
            root.delete_tree(f"{kind}/{hour}")
            gone += 1
    return gone


def compact(root: Root, erased: Mapping[str, float]) -> tuple[int, int]:
    """Rewrite every archive file that holds a row of an erased user from before the erasure, without those rows.

    Parameters
    ----------
    erased : mapping
        User hash (``infra.keys.user_hash``) → when erased.

    Returns
    -------
    files, rows : int
        Files rewritten (a file left with no row is removed) and rows removed.

    Only files whose chunk was committed before the newest erasure can hold such
    rows: a chunk committed later was drained later, and ``drain`` leaves out the
    rows of users erased by then. Each file's
    ``user_id`` and ``ts`` columns are read; only a file with a row to remove is
    read whole, and is replaced atomically (``_write``).
    """
    if not erased:
        return 0, 0
    root = as_objects(root)
    newest_ms = int(max(erased.values()) * 1000) + 1
    hashes: dict[str, str] = {}  # user id → hash, across files (a user's rows span many)
    files = rows = 0
    for kind in ("impressions", "labels"):
        schema = _schema(kind)
        cols = pa.schema([schema.field("user_id"), schema.field("ts")])
        for path in _parquet(root, kind):
            if _first_entry_ms(path) > newest_ms:
                continue
            t = root.read_table(path, schema=cols)
            users = t.column("user_id").to_pylist()
            for u in set(users) - hashes.keys():
                hashes[u] = keys.user_hash(u)
            ts = t.column("ts").to_numpy()
            drop = np.array([erased_event(erased, hashes[u], s) for u, s in zip(users, ts, strict=True)], bool)
            if not drop.any():
                continue
            whole = root.read_table(path, schema=schema)
            kept = whole.filter(pa.array(~drop))
            if kept.num_rows:
                _write_all(root, [(path, kept)])
            else:
                root.delete(path)
            files += 1
            rows += int(drop.sum())
    return files, rows
