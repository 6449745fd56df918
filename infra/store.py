"""Redis I/O for every piece of PrivAds state (key layout in ``infra.keys``).

Each store is a thin async wrapper: batching through pipelines, no maths. Who
may call the writing methods is fixed by the ownership table of docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
import numpy as np
import orjson
import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode
from redis.cluster import ClusterNode as SyncClusterNode
from redis.exceptions import DataError, NoPermissionError, WatchError
from redis.typing import EncodableT, FieldT, XReadResponse

from privads.infra import keys, records
from privads.infra.errors import Conflict, StartError
from privads.infra.partitioning import owner
from privads.infra.records import Ad
from privads.infra.settings import CLUSTER_SCHEME, cluster_nodes

log = logging.getLogger(__name__)


class HiredisConnection(aioredis.Connection):
    """An asyncio connection that packs commands with hiredis, in C.

    redis-py's sync client already does; its asyncio client packs every
    argument in Python, which was the workers' largest cost (batches write
    tens of thousands of fields per command).
    """

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        cmd = args[0]
        if isinstance(cmd, str):
            args = (*cmd.encode().split(), *args[1:])
        elif isinstance(cmd, (bytes, bytearray)) and b" " in cmd:
            args = (*cmd.split(), *args[1:])
        try:
            # hiredis's stub types the argument as a 1-tuple (Tuple[X] where it means Tuple[X, ...])
            return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        except TypeError as e:
            raise DataError(str(e)) from None


# how long a cluster commit waits for its master's replica to acknowledge it (``Cluster.replicated``)
REPLICA_ACK_MS = 2000


class Cluster(aioredis.RedisCluster):
    """A Redis Cluster client that also runs each single-slot transaction on the master owning the slot.

    redis-py routes plain commands and pipelines by slot; a WATCH/MULTI/EXEC of
    PrivAds touches one slot only (the hash tags of ``infra.keys``) and runs on
    a client of that slot's master (``node``), whose one connection also sends
    the ``WAIT`` that tells when the commit is on the replica (``replicated``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._masters: dict[str, aioredis.Redis] = {}
        self._user: str | None = kwargs.get("username")
        self._password: str | None = kwargs.get("password")

    async def node(self, key: str) -> aioredis.Redis:
        """A client of the master that owns ``key``'s slot, with one connection (transactions there, then WAIT)."""
        await self.initialize()  # the slot map is read on first use: a no-op once read
        n = self.get_node_from_key(key)
        if n is None:
            raise aioredis.ConnectionError(f"no master serves the slot of {key!r}")
        c = self._masters.get(n.name)
        if c is None:
            pool = aioredis.BlockingConnectionPool(host=n.host, port=n.port, max_connections=1, timeout=None,
                                                   connection_class=HiredisConnection, username=self._user,
                                                   password=self._password)
            c = self._masters[n.name] = aioredis.Redis(connection_pool=pool)
        return c

    def replicas_of(self, key: str) -> int:
        """How many replicas the map shows for ``key``'s master."""
        nodes = self.nodes_manager.slots_cache.get(self.keyslot(key), [])
        return max(len(nodes) - 1, 0)

    async def replicated(self, key: str) -> bool:
        """Whether every write made through ``node(key)`` so far is on a replica (True when the master has none)."""
        want = min(self.replicas_of(key), 1)
        if not want:
            return True
        acked = await (await self.node(key)).execute_command("WAIT", want, REPLICA_ACK_MS)
        return int(acked) >= want

    async def refresh(self) -> None:
        """Read the slot map again (after a failover) and drop the clients of former masters."""
        await self.nodes_manager.initialize()
        stale, self._masters = self._masters, {}
        for c in stale.values():
            await c.aclose()

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        for c in self._masters.values():
            await c.aclose()
        self._masters = {}
        await super().aclose(*args, **kwargs)


Client = aioredis.Redis | Cluster


def connect(url: str) -> Client:
    """A client of ``url``: ``redis://…`` (one server) or ``redis+cluster://host:port[,host:port…]`` (a cluster)."""
    if url.startswith(CLUSTER_SCHEME + "://"):
        nodes, user, password = cluster_nodes(url)
        return Cluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=user, password=password,
                       decode_responses=False, health_check_interval=10)
    return aioredis.from_url(url, decode_responses=False, health_check_interval=10,
                             connection_class=HiredisConnection)


def connect_sync(url: str, **options: Any) -> redis.Redis | redis.RedisCluster:
    """The blocking client of ``url`` (threads: the archive drain, the supervisor, the benches); ``options`` are
    redis-py's (``socket_timeout``, …)."""
    if url.startswith(CLUSTER_SCHEME + "://"):
        nodes, user, password = cluster_nodes(url)
        return redis.RedisCluster(startup_nodes=[SyncClusterNode(h, p) for h, p in nodes], username=user,
                                  password=password, **options)
    return redis.Redis.from_url(url, **options)


async def on_node(r: Client, key: str) -> aioredis.Redis:
    """The client to run a transaction on ``key``'s slot with: ``r`` itself, or the slot's master in a cluster."""
    return await r.node(key) if isinstance(r, Cluster) else r


async def mget(r: Client, names: Sequence[str]) -> list[bytes | None]:
    """GET of many keys in one round trip per node, whatever their slots."""
    if not names:
        return []
    if isinstance(r, Cluster):
        return cast(list[bytes | None], await r.mget_nonatomic(list(names)))
    return cast(list[bytes | None], await r.mget(list(names)))


# Replies are bytes, never str: no client of PrivAds turns decode_responses on (``connect`` leaves it off, the sync
# clients keep the default). redis-py's annotations cannot see the flag and say ``bytes | str``: hence the casts.

# A stream's entries as XRANGE, XREVRANGE and XREAD return them: (id, fields). Only XCLAIM/XAUTOCLAIM can
# return the (None, None) of a deleted entry that redis-py's StreamEntry allows for.
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


def _xread_entries(reply: XReadResponse) -> StreamEntries:
    """The entries of the one stream an XREAD read: RESP2's reply is ``[[stream, entries]]``, or empty."""
    streams = cast(list[list[Any]], reply)
    return streams[0][1] if streams else []


# --- catalog -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    ad_id: str
    text: str
    bid: float
    category: str | None
    active: bool
    text_hash: str


class CatalogStore:
    """Ads, their text embeddings (cached by text hash) and the change log."""

    def __init__(self, r: Client) -> None:
        self.r = r

    async def cached_embeddings(self, hashes: Sequence[str]) -> list[bytes | None]:
        if not hashes:
            return []
        return cast(list[bytes | None], await self.r.mget([keys.embedding(h) for h in hashes]))

    async def upsert(self, ads: Sequence[Ad], hashes: Sequence[str], new_embeddings: dict[str, np.ndarray]) -> None:
        """Store ads and their embeddings, then log the change (readers follow the log).

        ``new_embeddings`` holds every text hash of ``ads`` whose embedding the caller has,
        the cached ones too: written again in the same transaction, an embedding that
        ``drop_unused_embeddings`` removed after the caller read the cache comes back
        with the ad that uses it.
        """
        pipe = (await on_node(self.r, keys.CATALOG_LOG)).pipeline(transaction=True)
        for h, vec in new_embeddings.items():
            pipe.set(keys.embedding(h), vec.astype("<f4").tobytes())
        for ad, h in zip(ads, hashes, strict=True):
            pipe.hset(keys.ad(ad.ad_id), mapping={
                "text": ad.text, "bid": repr(float(ad.bid)), "category": ad.category or "",
                "active": "1" if ad.active else "0", "text_hash": h, "ts": repr(float(ad.ts)),
            })
            pipe.sadd(keys.ADS, ad.ad_id)
            pipe.xadd(keys.CATALOG_LOG, {"ad_id": ad.ad_id}, maxlen=1_000_000, approximate=True)
        await pipe.execute()

    async def all_ids(self) -> list[str]:
        return sorted(x.decode() for x in cast(set[bytes], await self.r.smembers(keys.ADS)))

    async def drop_unused_embeddings(self, now: float, grace_s: float) -> int:
        """Delete the embeddings no ad has used for ``grace_s`` (mark, then sweep); returns how many.

        A pass lists the stored embeddings, then the text hash of every ad; an embedding
        unused now is marked (``embunused``) and deleted by a later pass that finds it
        still unused ``grace_s`` after the mark. The writes are one transaction watching
        ``catalog:log``: a catalog change during the pass aborts it (the next pass tries
        again), and an upsert that read an embedding from the cache before it was
        deleted writes it again with the ad (``upsert``).
        """
        stored = {k.decode()[len(keys.EMBEDDING_PREFIX):]
                  async for k in self.r.scan_iter(match=keys.EMBEDDING_PREFIX + "*", count=1000)}
        async with (await on_node(self.r, keys.CATALOG_LOG)).pipeline(transaction=True) as tx:
            await tx.watch(keys.CATALOG_LOG)
            ids = await self.all_ids()
            used: set[str] = set()
            for i in range(0, len(ids), 10_000):  # bounded replies (the reads need not be on the watching connection)
                pipe = self.r.pipeline(transaction=False)
                for a in ids[i:i + 10_000]:
                    pipe.hget(keys.ad(a), "text_hash")
                used.update(h.decode() for h in await pipe.execute() if h is not None)
            pairs = cast(list[tuple[bytes, float]], await self.r.zrange(keys.EMBEDDINGS_UNUSED, 0, -1, withscores=True))
            marks = {h.decode(): float(t) for h, t in pairs}
            unused = stored - used
            due = sorted(h for h in unused if h in marks and now - marks[h] >= grace_s)
            new_marks: dict[str, float] = {h: now for h in unused if h not in marks}
            back = [h for h in marks if h not in unused]  # used again, or gone
            tx.multi()
            if due:
                tx.delete(*[keys.embedding(h) for h in due])
            if due or back:
                tx.zrem(keys.EMBEDDINGS_UNUSED, *due, *back)
            if new_marks:
                tx.zadd(keys.EMBEDDINGS_UNUSED, new_marks)
            try:
                await tx.execute()
            except WatchError:
                return 0  # the catalog changed meanwhile: the next pass sees it
        return len(due)

    async def read(self, ad_ids: Sequence[str]) -> tuple[list[CatalogEntry], np.ndarray]:
        """Ads and their text embeddings; ads without a stored embedding are skipped.

        Returns
        -------
        entries : list of CatalogEntry, length n
        embeddings : ndarray, shape (n, 384)
        """
        pipe = self.r.pipeline(transaction=False)
        for a in ad_ids:
            pipe.hgetall(keys.ad(a))
        rows = await pipe.execute()
        entries = []
        for a, h in zip(ad_ids, rows, strict=True):
            if not h:
                continue
            entries.append(CatalogEntry(
                ad_id=a, text=h[b"text"].decode(), bid=float(h[b"bid"]),
                category=h[b"category"].decode() or None, active=h[b"active"] == b"1",
                text_hash=h[b"text_hash"].decode(),
            ))
        blobs = await self.cached_embeddings([e.text_hash for e in entries])
        kept = [(e, b) for e, b in zip(entries, blobs, strict=True) if b is not None]
        if not kept:
            return [], np.zeros((0, 384), dtype=np.float32)
        return [e for e, _ in kept], np.stack([np.frombuffer(b, dtype="<f4") for _, b in kept])

    async def last_change(self) -> str:
        """Id of the newest catalog change ("0-0" when none)."""
        last = cast(StreamEntries | None, await self.r.xrevrange(keys.CATALOG_LOG, count=1))
        return last[0][0].decode() if last else "0-0"

    async def changes_since(
        self, change_id: str, block_ms: int | None = None, count: int = 10_000
    ) -> tuple[str, list[str]]:
        """Ad ids changed after ``change_id``; returns (newest change id, ad ids)."""
        entries = _xread_entries(await self.r.xread({keys.CATALOG_LOG: change_id}, count=count, block=block_ms))
        if not entries:
            return change_id, []
        return entries[-1][0].decode(), list(dict.fromkeys(f[b"ad_id"].decode() for _, f in entries))


# --- users -------------------------------------------------------------------


class UserStore:
    """Per-user posterior (mean, diagonal precision, count) and erasure tombstones.

    ``partitions`` is the workers' partition count (``Settings.partitions``): a user's keys live in its partition's
    slot (``keys.user``), found without a scan.
    """

    def __init__(self, r: Client, partitions: int) -> None:
        self.r = r
        self.partitions = partitions

    async def get_with_tastes(self, user_id: str) -> tuple[tuple[np.ndarray, np.ndarray, int] | None, np.ndarray]:
        """One user's (mean, precision, count) or None, and their tastes (``keys.unpack_tastes``), in one GET."""
        blob = cast(bytes | None, await self.r.get(keys.user(user_id, self.partitions)))
        if not blob:
            return None, keys.no_tastes()
        return keys.unpack_user(blob), keys.unpack_tastes(blob)

    async def get_many_with_tastes(self, user_ids: Sequence[str]) -> list[
            tuple[tuple[np.ndarray, np.ndarray, int], np.ndarray] | None]:
        """``get_with_tastes`` of many users (None for a user the stream has not learned about)."""
        if not user_ids:
            return []
        blobs = await mget(self.r, [keys.user(u, self.partitions) for u in user_ids])
        return [(keys.unpack_user(b), keys.unpack_tastes(b)) if b else None for b in blobs]

    async def get_many(self, user_ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, int] | None]:
        if not user_ids:
            return []
        blobs = await mget(self.r, [keys.user(u, self.partitions) for u in user_ids])
        return [keys.unpack_user(b) if b else None for b in blobs]

    async def exist_many(self, user_ids: Sequence[str]) -> list[bool]:
        """Whether the stream holds a state for each user (False once erased), without reading the states."""
        if not user_ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.exists(keys.user(u, self.partitions))
            return [bool(n) for n in await pipe.execute()]

    async def erased_at(self, user_ids: Sequence[str]) -> list[float | None]:
        if not user_ids:
            return []
        vals = await mget(self.r, [keys.erased(u, self.partitions) for u in user_ids])
        return [float(v) if v else None for v in vals]

    async def erase(self, user_id: str, now: float) -> None:
        """Delete the user's state and pending events; events for it up to ``now`` are ignored from then on.

        The tombstone (``erased:{p}:{hash}``) is kept for good: an event of the user however
        old (a backfilled export, a backlog) is older than it and ignored, so nothing
        brings the user back; a new event of the same id after ``now`` starts a new user.
        The erasure also waits in ``erasures:{p}`` until the archive's compaction has
        removed the user's rows (``learner.erasure``).

        Bumps the ``seq`` of the user's partition (the only one whose owner writes
        the user) so that a worker holding a state read before the erasure cannot
        write it back (its commit is fenced on seq). The user's vector leaves its
        partition's population sum in the same transaction, so the population prior
        no longer holds any of it. The user's impressions still waiting for a click
        (and clicks waiting for their impression) are scrubbed from the partition's
        buckets by its owner, off the request path, at its next tick
        (``PartitionStore.scrub_erased``; queued in ``erasing:{p}``).

        Every key it writes is in the partition's slot: one transaction on a cluster
        too, which returns only once a replica holds it (a failover cannot undo it).

        Raises
        ------
        redis.exceptions.ConnectionError
            When no replica acknowledged the erasure in time: it may not survive a failover; asking again is safe.
        """
        home = owner(user_id.encode(), self.partitions)
        ukey = keys.user_in(user_id, home)
        node = await on_node(self.r, ukey)
        async with node.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(ukey, keys.population(home))
                    blob = cast(bytes | None, await pipe.get(ukey))
                    pop = cast(bytes | None, await pipe.get(keys.population(home)))
                    pipe.multi()
                    pipe.delete(ukey)
                    pipe.set(keys.erased(user_id, self.partitions), repr(now))
                    pipe.zadd(keys.erasures(home), {keys.user_hash(user_id): now})
                    pipe.zrem(keys.seen(home), user_id)
                    if blob and pop:
                        mean = keys.unpack_user(blob)[0]
                        total, users = keys.unpack_population(pop)
                        if total.shape == mean.shape:
                            pipe.set(keys.population(home), keys.pack_population(total - mean, max(users - 1, 0)))
                    pipe.hincrby(keys.checkpoint(home), "seq", 1)
                    pipe.zadd(keys.erasing(home), {user_id: now})
                    await pipe.execute()
                    break
                except WatchError:
                    continue  # a worker committed this user meanwhile: read again
        if isinstance(self.r, Cluster) and not await self.r.replicated(ukey):
            raise aioredis.ConnectionError(f"no replica acknowledged the erasure within {REPLICA_ACK_MS} ms")

    async def erased_since(self, user_ids: Sequence[str]) -> dict[str, float]:
        """The erased ones of ``user_ids`` (distinct), with when: their events up to then are not to be seen."""
        distinct = list(dict.fromkeys(user_ids))
        out: dict[str, float] = {}
        for i in range(0, len(distinct), 10_000):  # bounded replies, whatever the number of users
            part = distinct[i:i + 10_000]
            out.update({u: t for u, t in zip(part, await self.erased_at(part), strict=True) if t is not None})
        return out

    async def oldest_unarchived(self) -> float | None:
        """When the oldest batch still waiting in an ``arch:{p}`` stream was committed (None: every one is drained)."""
        pipe = self.r.pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.xrange(keys.archive(p), count=1)
        firsts = [int(e[0][0].decode().split("-")[0]) / 1000 for e in await pipe.execute() if e]
        return min(firsts) if firsts else None

    async def pending_erasures(self) -> dict[str, float]:
        """Erasures whose archive rows may still be on disk: user hash → erased at."""
        pipe = self.r.pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.zrange(keys.erasures(p), 0, -1, withscores=True)
        out: dict[str, float] = {}
        for pairs in await pipe.execute():
            for h, t in pairs:
                out[h.decode()] = max(float(t), out.get(h.decode(), 0.0))
        return out

    async def settle_erasures(self, done: dict[str, float]) -> int:
        """Forget the erasures the archive no longer holds a row of; returns how many.

        Only an erasure still at the time ``done`` names is removed: the same id erased
        again meanwhile (a later time) waits for the next compaction pass.
        """
        # a user hash does not tell its partition: each partition's queue drops the ones it holds
        return sum([await _zrem_unless_newer(self.r, keys.erasures(p), done) for p in range(self.partitions)])

    async def populations(self, partitions: Sequence[int] | None = None) -> dict[int, tuple[np.ndarray, int]]:
        """Each partition's population sum (of the learned users' means) and user count; all partitions if None."""
        partitions = list(range(self.partitions) if partitions is None else partitions)
        blobs = await mget(self.r, [keys.population(p) for p in partitions])
        return {p: keys.unpack_population(b) for p, b in zip(partitions, blobs, strict=True) if b}

    async def population_sum(self, d: int) -> tuple[np.ndarray, int]:
        """The learned users' means summed over every partition (of dimension ``d``), and how many users."""
        total, users = np.zeros(d), 0
        for t, n in (await self.populations()).values():
            if t.shape == (d,):
                total += t
                users += n
        return total, users

    async def exists(self, user_id: str) -> bool:
        return bool(await self.r.exists(keys.user(user_id, self.partitions)))


async def _zrem_unless_newer(r: Client, key: str, done: dict[str, float]) -> int:
    """Remove the members of zset ``key`` that ``done`` names, each only while its score is at most the one given
    (a member added again meanwhile, with a later time, stays for the next pass); returns how many were removed."""
    if not done:
        return 0
    members = list(done)
    async with (await on_node(r, key)).pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                scores = await pipe.zmscore(key, members)
                gone = [m for m, t in zip(members, scores, strict=True) if t is not None and t <= done[m]]
                pipe.multi()
                if gone:
                    pipe.zrem(key, *gone)
                await pipe.execute()
                return len(gone)
            except WatchError:
                continue


# --- partition state (the workers' exactly-once unit) -----------------------------------


def _mark(v: bytes) -> tuple[float, float]:
    """A topic's ``wm:`` field, as ``commit`` writes it: ``"{watermark!r},{seen!r}"``."""
    watermark, seen = v.split(b",")
    return float(watermark), float(seen)


@dataclass
class Checkpoint:
    """What ``ckpt:{p}`` holds: input offsets per topic and the partition's bookkeeping."""

    offsets: dict[str, int]
    fingerprints: dict[str, int]
    seq: int
    closed_before: int | None
    marks: dict[str, tuple[float, float]]

    @classmethod
    def parse(cls, h: dict[bytes, bytes]) -> Checkpoint:
        offsets = {k[4:].decode(): int(v) for k, v in h.items() if k.startswith(b"off:")}
        fingerprints = {k[3:].decode(): int(v) for k, v in h.items() if k.startswith(b"fp:")}
        closed = int(h[b"closed"]) if b"closed" in h else None
        marks = {k[3:].decode(): _mark(v) for k, v in h.items() if k.startswith(b"wm:")}
        return cls(offsets, fingerprints, int(h.get(b"seq", 0)), closed, marks)


@dataclass
class PartitionWrites:
    """Everything one partition's batch writes, applied in one transaction."""

    partition: int
    offsets: dict[str, int]
    fingerprints: dict[str, int]  # topic → timestamp (ms) of the last record consumed: identifies the log
    closed_before: int
    marks: dict[str, tuple[float, float]]  # input topic → (watermark, wall time of its last delivery)
    pending: dict[int, dict[str, bytes]] = field(default_factory=dict)
    pending_ttl_s: int = 3600
    put_orphans: dict[str, bytes] = field(default_factory=dict)
    del_orphans: set[str] = field(default_factory=set)
    drop_buckets: set[int] = field(default_factory=set)
    archive: dict[bytes, bytes] | None = None
    population: bytes | None = None  # the partition's new population sum (keys.pack_population)
    touched: dict[str, float] = field(default_factory=dict)  # users of p written now → wall time (``seen:{p}``)
    expired: list[str] = field(default_factory=list)  # idle users of p to forget (their keys and ``seen`` entries)
    users: dict[str, bytes] = field(default_factory=dict)  # user id of p → packed new state (``keys.pack_user``)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # global hash → field → increment
    arms: set[str] = field(default_factory=set)  # the arms (policies) counted


@dataclass
class Committed:
    """What a commit made durable, per partition: the newest ``arch:{p}`` and ``out:{p}`` entries it wrote.

    On one server every committed entry may be drained and folded at once. On a
    cluster only entries a replica holds are (``Cluster.replicated``): a failover to
    a replica that lacks a commit replays its events, and what was drained or
    folded of it would count twice.
    """

    archive: dict[int, str] = field(default_factory=dict)
    outbox: dict[int, str] = field(default_factory=dict)


async def _fence(pipe: Pipeline, expected_seq: dict[int, int]) -> None:
    """WATCH the partitions' checkpoints and check their ``seq`` is still the one read."""
    await pipe.watch(*[keys.checkpoint(p) for p in expected_seq])
    for p, want in expected_seq.items():
        now = int(await pipe.hget(keys.checkpoint(p), "seq") or 0)
        if now != want:
            raise Conflict(f"partition {p}: seq {now} != {want}")


# where the reply of a partition's archive XADD is among its transaction's: ``_write_partition`` queues it first
ARCHIVE_REPLY = 0


def _write_partition(pipe: Pipeline, w: PartitionWrites) -> None:
    """Queue the writes of one partition's state, every key in its slot; the archive entry first (``ARCHIVE_REPLY``)."""
    # The type: ignores below are for redis-py's stubs: hset types its mapping Mapping[FieldT, EncodableT]
    # and xadd its fields dict[FieldT, EncodableT]; their key type is invariant, so a dict[str, bytes] or a
    # dict[bytes, bytes] is refused (mset and zadd take a TypeVar key and accept them).
    p = w.partition
    if w.archive:
        pipe.xadd(keys.archive(p), w.archive)  # type: ignore[arg-type]  # see above
    ck = keys.checkpoint(p)
    mapping: dict[FieldT, EncodableT] = {f"off:{t}": o for t, o in w.offsets.items()}
    mapping.update({f"fp:{t}": f for t, f in w.fingerprints.items()})
    mapping["closed"] = w.closed_before
    mapping.update({f"wm:{t}": f"{wm!r},{seen!r}" for t, (wm, seen) in w.marks.items()})
    pipe.hset(ck, mapping=mapping)
    pipe.hincrby(ck, "seq", 1)
    for b, recs in w.pending.items():
        key = keys.pending(p, b)
        pipe.hset(key, mapping=recs)  # type: ignore[arg-type]  # see above
        pipe.expire(key, w.pending_ttl_s)
    if w.pending:
        pipe.sadd(keys.buckets(p), *w.pending)
    if w.drop_buckets:
        pipe.srem(keys.buckets(p), *w.drop_buckets)
        pipe.delete(*[keys.pending(p, b) for b in w.drop_buckets])
    if w.put_orphans:
        pipe.hset(keys.orphans(p), mapping=w.put_orphans)  # type: ignore[arg-type]  # see above
    if w.del_orphans:
        pipe.hdel(keys.orphans(p), *w.del_orphans)
    if w.population is not None:
        pipe.set(keys.population(p), w.population)
    if w.touched:
        pipe.zadd(keys.seen(p), w.touched)
    if w.expired:
        pipe.delete(*[keys.user_in(u, p) for u in w.expired])
        pipe.zrem(keys.seen(p), *w.expired)
    if w.users:
        pipe.mset({keys.user_in(u, p): blob for u, blob in w.users.items()})


def _add_counters(into: dict[str, dict[str, float]], incs: dict[str, dict[str, float]]) -> None:
    """Add global counter increments (hash key → field → n) into ``into`` (a ``defaultdict`` of them)."""
    for key, fields in incs.items():
        for f, n in fields.items():
            into[key][f] += n


# Every increment of a batch's global counters in one command: a HINCRBY per field is one reply per field for the
# client to read back (hundreds per batch: per ad and arm), which cost the workers more than Redis' work. KEYS: the
# hashes; ARGV, per key: its TTL (0: none), its number of fields, then (field, increment) pairs. The arms' value
# fields (``keys.ARM_VALUE_FIELDS``, "value:…") are floats: HINCRBYFLOAT; every other field counts, HINCRBY.
_HINCRBY_MANY = """
local a = 1
for _, key in ipairs(KEYS) do
  local ttl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    if string.sub(ARGV[a], 1, 6) == 'value:' then
      redis.call('HINCRBYFLOAT', key, ARGV[a], ARGV[a + 1])
    else
      redis.call('HINCRBY', key, ARGV[a], ARGV[a + 1])
    end
    a = a + 2
  end
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
return #KEYS
"""


def _write_global(pipe: Pipeline, counters: dict[str, dict[str, float]], arms: set[str],
                  max_user_updates: int) -> None:
    """Queue the increments of the global counters (``{g}``), their TTLs and the per-ad count log."""
    names: list[str] = []
    args: list[EncodableT] = []
    for key, incs in counters.items():
        fields = [(f, n) for f, n in incs.items() if n]
        # arm counters are kept long enough for the windows /lift reads them for, then gone (0: no TTL)
        ttl = keys.arm_ttl(key) or 0
        if fields or ttl:
            names.append(key)
            args += [ttl, len(fields), *[x for pair in fields for x in pair]]
    if names:
        pipe.eval(_HINCRBY_MANY, len(names), *names, *args)
    deltas = ad_count_deltas(counters)
    if deltas:  # the API follows the per-ad counts through this log instead of reading the hashes
        pipe.xadd(keys.ADSTAT_LOG, {"d": orjson.dumps(deltas)}, approximate=True,
                  minid=f"{int((time.time() - keys.ADSTAT_LOG_HORIZON_S) * 1000)}-0")
    if arms:
        pipe.sadd(keys.ARMS, *arms)
    if max_user_updates:
        pipe.zadd(keys.DP_MAX_UPDATES, {"max": max_user_updates}, gt=True)


class PartitionStore:
    """Reads and atomic commits of partition state; every commit bumps ``seq`` and is fenced on it."""

    def __init__(self, r: Client) -> None:
        self.r = r

    async def checkpoints(self, partitions: Sequence[int]) -> tuple[dict[int, Checkpoint], dict[int, set[int]]]:
        """Checkpoint and bucket set of each partition."""
        pipe = self.r.pipeline(transaction=False)
        for p in partitions:
            pipe.hgetall(keys.checkpoint(p))
            pipe.smembers(keys.buckets(p))
        res = await pipe.execute()
        ckpts = {p: Checkpoint.parse(res[2 * i]) for i, p in enumerate(partitions)}
        bkts = {p: {int(b) for b in res[2 * i + 1]} for i, p in enumerate(partitions)}
        return ckpts, bkts

    async def scrub_erased(self, p: int, limit: int = 1000) -> int:
        """Remove the pending impressions and waiting clicks of partition ``p``'s users erased lately.

        The erasures wait in ``erasing:{p}`` (``UserStore.erase``); one pass takes up to
        ``limit`` of them, reads the partition's buckets once for all, and deletes the
        entries of those users from before their erasure. Each user leaves the queue only
        if not erased again meanwhile. Returns how many entries were removed.
        """
        queued = cast(list[tuple[bytes, float]], await self.r.zrange(keys.erasing(p), 0, limit - 1, withscores=True))
        if not queued:
            return 0
        when = {u.decode(): t for u, t in queued}
        removed = 0
        buckets = [int(b) for b in await self.r.smembers(keys.buckets(p))]
        for key in [keys.pending(p, b) for b in buckets] + [keys.orphans(p)]:
            entries = cast(dict[bytes, bytes], await self.r.hgetall(key))
            unpack = records.unpack_click if key == keys.orphans(p) else records.unpack_pending
            mine = [iid for iid, blob in entries.items()
                    if records.erased_event(when, (rec := unpack(blob)).user_id, rec.ts)]
            if mine:
                removed += int(await self.r.hdel(key, *mine))
        await _zrem_unless_newer(self.r, keys.erasing(p), when)
        return removed

    async def read(self, requests: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Run a list of read commands ``(name, args)`` in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for name, args in requests:
            getattr(pipe, name)(*args)
        return await pipe.execute()

    async def commit(self, expected_seq: dict[int, int], writes: Sequence[PartitionWrites],
                     max_user_updates: int = 0) -> Committed | None:
        """Apply the writes of a batch atomically, if no other writer touched its partitions since they were read.

        On one server the whole batch is one transaction, global counters included. On a
        cluster each partition's writes are one transaction in its slot (``infra.keys``),
        in partition order, and its global counter increments go to its outbox
        (``out:{p}``) for ``fold``; a partition's commit fences only itself.

        Returns
        -------
        Committed or None
            On a cluster, the archive and outbox entries now on a replica (none for a partition whose replica did
            not answer in time: a later commit's acknowledgement covers them); None on one server.

        Raises
        ------
        Conflict
            If a partition's ``seq`` moved (another worker, or an erasure): nothing was written for it (on a
            cluster, the partitions before it in the batch are committed; their records are past their
            checkpoints, so a re-plan skips them).
        """
        if isinstance(self.r, Cluster):
            return await self._commit_per_partition(self.r, expected_seq, writes, max_user_updates)
        async with self.r.pipeline(transaction=True) as pipe:
            await _fence(pipe, expected_seq)
            pipe.multi()
            counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(int))
            arms: set[str] = set()
            for w in writes:
                _write_partition(pipe, w)
                _add_counters(counters, w.counters)
                arms |= w.arms
            _write_global(pipe, counters, arms, max_user_updates)
            try:
                await pipe.execute()
            except aioredis.WatchError as e:
                raise Conflict(str(e)) from None
        return None

    async def _commit_per_partition(self, r: Cluster, expected_seq: dict[int, int],
                                    writes: Sequence[PartitionWrites], max_user_updates: int) -> Committed:
        done = Committed()
        for w in sorted(writes, key=lambda w: w.partition):
            ck = keys.checkpoint(w.partition)
            async with (await r.node(ck)).pipeline(transaction=True) as pipe:
                await _fence(pipe, {w.partition: expected_seq[w.partition]})
                pipe.multi()
                _write_partition(pipe, w)
                box = {"c": w.counters, "a": sorted(w.arms), "m": max_user_updates}
                pipe.xadd(keys.outbox(w.partition), {"d": orjson.dumps(box)})
                try:
                    res = await pipe.execute()
                except aioredis.WatchError as e:
                    raise Conflict(str(e)) from None
            if await r.replicated(ck):
                done.outbox[w.partition] = res[-1].decode()
                if w.archive:
                    done.archive[w.partition] = res[ARCHIVE_REPLY].decode()
        return done

    async def durable_tips(self, partition: int) -> Committed:
        """On a cluster: the newest outbox and archive entries of ``partition``, once a replica is known to hold them.

        For entries no commit of this process acknowledged (a previous owner's, killed before it folded them, or a
        commit whose acknowledgement timed out): a write of this process to the partition's master after reading
        them (a ``fence`` field of ``ckpt:{p}``), acknowledged by a replica, proves they are there too, since a
        master replicates in order.
        """
        assert isinstance(self.r, Cluster), "one server has no replica to wait for"
        pipe = self.r.pipeline(transaction=False)
        pipe.xrevrange(keys.outbox(partition), count=1)
        pipe.xrevrange(keys.archive(partition), count=1)
        box, arch = await pipe.execute()
        tips = Committed()
        if not box and not arch:
            return tips
        ck = keys.checkpoint(partition)
        await (await self.r.node(ck)).hset(ck, "fence", repr(time.time()))
        if await self.r.replicated(ck):
            if box:
                tips.outbox[partition] = box[0][0].decode()
            if arch:
                tips.archive[partition] = arch[0][0].decode()
        return tips

    async def fold(self, partition: int, upto: str, limit: int = 1000) -> int:
        """Move partition ``partition``'s outbox entries up to id ``upto`` into the global counters, exactly once.

        The fold cursor (``folded:{g}``) moves in the same transaction as the counters, so an entry is added once
        however often and by whomever it is folded; the entries folded are then trimmed. Returns how many.
        """
        assert isinstance(self.r, Cluster), "one server has no outbox: its commits write the counters"
        box = keys.outbox(partition)
        folded = 0
        while True:
            node = await self.r.node(keys.FOLDED)
            async with node.pipeline(transaction=True) as pipe:
                await pipe.watch(keys.FOLDED)
                cursor = cast(bytes | None, await pipe.hget(keys.FOLDED, str(partition)))
                start = "(" + cursor.decode() if cursor else "-"
                entries = cast(StreamEntries, await self.r.xrange(box, start, upto, count=limit))
                if not entries:
                    return folded
                counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(int))
                arms: set[str] = set()
                most = 0
                for _, fields in entries:
                    d = orjson.loads(fields[b"d"])
                    _add_counters(counters, d["c"])
                    arms.update(d["a"])
                    most = max(most, int(d["m"]))
                pipe.multi()
                _write_global(pipe, counters, arms, most)
                pipe.hset(keys.FOLDED, str(partition), entries[-1][0])
                try:
                    await pipe.execute()
                except aioredis.WatchError:
                    continue  # another folder moved the cursor: read it again
            folded += len(entries)
            # the cursor holds it: trim what was folded (a failed trim leaves entries the cursor skips)
            await self.r.xtrim(box, minid=keys.entry_after(entries[-1][0].decode()), approximate=False)
            if len(entries) < limit:
                return folded

    async def reset_offsets(self, partition: int, topics: Sequence[str]) -> None:
        """Forget the input offsets of a partition's topics (their log was replaced); fenced like any write."""
        pipe = (await on_node(self.r, keys.checkpoint(partition))).pipeline(transaction=True)
        pipe.hdel(keys.checkpoint(partition), *[f"{k}:{t}" for t in topics for k in ("off", "fp")])
        pipe.hincrby(keys.checkpoint(partition), "seq", 1)
        await pipe.execute()

    async def set_partitions(self, n: int) -> None:
        await self.r.set(keys.PARTITIONS, n)


# --- counters for /lift and /metrics ------------------------------------------------


def ad_count_deltas(counters: dict[str, dict[str, float]]) -> dict[str, dict[str, list[int]]]:
    """The per-ad increments among a batch's counters that the API follows.

    Returns policy → ad id → [clicks, shown, µ-expected] (``keys.AD_COUNT_FIELDS``).
    """
    out: dict[str, dict[str, list[int]]] = {}
    for key, incs in counters.items():
        parsed = keys.parse_adstat(key)
        if parsed is None:
            continue
        policy, what = parsed
        if what not in keys.AD_COUNT_FIELDS:
            continue
        i = keys.AD_COUNT_FIELDS.index(what)
        arm = out.setdefault(policy, {})
        for ad_id, n in incs.items():
            if n:
                arm.setdefault(ad_id, [0] * len(keys.AD_COUNT_FIELDS))[i] += int(n)  # per-ad counts: integers
    return {p: ads for p, ads in out.items() if ads}


class AdCountLog:
    """Read side of the per-ad counts: a consistent snapshot of the arms' hashes, then the workers' increments.

    The snapshot and the id of the log's newest entry are read in one
    transaction, so applying every later entry to the snapshot gives exactly the
    hashes' state, without reading them again.
    """

    def __init__(self, r: Client) -> None:
        self.r = r

    async def snapshot(self, policies: Sequence[str]) -> tuple[dict[str, dict[str, list[int]]], bytes]:
        """policy → ad id → [clicks, shown, µ-expected], and the log id the snapshot is current to."""
        pipe = (await on_node(self.r, keys.ADSTAT_LOG)).pipeline(transaction=True)
        for p in policies:
            for what in keys.AD_COUNT_FIELDS:
                pipe.hgetall(keys.adstat(p, what))
        pipe.xrevrange(keys.ADSTAT_LOG, count=1)
        res = await pipe.execute()
        out: dict[str, dict[str, list[int]]] = {}
        for j, p in enumerate(policies):
            arm = out.setdefault(p, {})
            for i in range(len(keys.AD_COUNT_FIELDS)):
                for ad_id, n in res[j * len(keys.AD_COUNT_FIELDS) + i].items():
                    arm.setdefault(ad_id.decode(), [0] * len(keys.AD_COUNT_FIELDS))[i] = int(n)
        last = res[-1][0][0] if res[-1] else b"0-0"
        return out, last

    async def since(self, last_id: bytes, block_ms: int | None = None,
                    count: int = 1000) -> tuple[list[dict[str, dict[str, list[int]]]], bytes]:
        """The increments logged after ``last_id`` (waiting up to ``block_ms`` for one), and the newest id read."""
        entries = _xread_entries(await self.r.xread({keys.ADSTAT_LOG: last_id}, count=count, block=block_ms))
        if not entries:
            return [], last_id
        return [orjson.loads(fields[b"d"]) for _, fields in entries], entries[-1][0]


# /lift/series returns at most this many buckets per arm (12 hours of minutes, 30 days of hours)
SERIES_MAX_POINTS = 720


@dataclass(frozen=True, slots=True)
class ArmBucket:
    """One arm's counts over some minutes: impressions, clicks, and the sums of the clicks' values and squares."""

    impressions: int = 0
    clicks: int = 0
    value: float = 0.0
    value_sq: float = 0.0


class Counters:
    """Read side of the workers' exact counters: per-arm CTR buckets, global stats."""

    def __init__(self, r: Client) -> None:
        self.r = r

    async def stats(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in cast(dict[bytes, bytes], await self.r.hgetall(keys.STATS)).items()}

    async def _arms(self) -> list[str]:
        return sorted(a.decode() for a in cast(set[bytes], await self.r.smembers(keys.ARMS)))

    async def _read_arms(self, arms: list[str], buckets: list[tuple[int, int]]) -> dict[str, list[ArmBucket]]:
        """Each arm's counts in each of ``buckets`` (span, index), in one pipelined round trip."""
        pipe = self.r.pipeline(transaction=False)
        for a in arms:
            for span, b in buckets:
                pipe.hmget(keys.arm(a, b, span), "impressions", "clicks", *keys.ARM_VALUE_FIELDS)
        res = iter(await pipe.execute())
        out: dict[str, list[ArmBucket]] = {}
        for a in arms:
            out[a] = []
            for _ in buckets:
                n, c, v, sq = next(res)
                out[a].append(ArmBucket(int(n or 0), int(c or 0), float(v or 0.0), float(sq or 0.0)))
        return out

    async def arm_series(self, window_s: float, now: float | None = None,
                         max_points: int = SERIES_MAX_POINTS) -> tuple[int, list[float], dict[str, dict]]:
        """Impressions and clicks per arm and time bucket, for impressions in the last ``window_s`` seconds.

        The buckets are the finest span (minute, hour, day) that gives at most ``max_points`` of them and is still
        kept for the window's start, so one call reads at most ``max_points + 1`` buckets per arm.

        Returns
        -------
        span : int
            Each bucket's length, seconds.
        starts : list of float
            Each bucket's start (Unix seconds), oldest first; the first may begin before the window.
        arms : dict
            arm → {"impressions": [...], "clicks": [...], "value": [...], "value_sq": [...]}, aligned with
            ``starts`` (value: the sum of the clicks' values, value_sq: of their squares).
        """
        now = time.time() if now is None else now
        span = next((s for s in sorted(keys.ARM_SPANS) if window_s / s <= max_points
                     and now - window_s >= now - keys.ARM_SPANS[s][1] + s), max(keys.ARM_SPANS))
        first, last = int(now - window_s) // span, int(now) // span
        buckets = [(span, b) for b in range(first, last + 1)]
        arms = await self._arms()
        read = await self._read_arms(arms, buckets)
        out = {a: {"impressions": [x.impressions for x in read[a]], "clicks": [x.clicks for x in read[a]],
                   "value": [x.value for x in read[a]], "value_sq": [x.value_sq for x in read[a]]} for a in arms}
        return span, [float(b * span) for _, b in buckets], out

    async def arm_counts(self, window_s: float, now: float | None = None) -> dict[str, ArmBucket]:
        """Impressions, clicks and the clicks' value per arm for impressions in the last ``window_s`` seconds
        (whole minutes).

        Read from the roll-ups (``keys.arm_cover``): at most about 170 buckets per arm plus one per day of window.
        """
        now = time.time() if now is None else now
        buckets = keys.arm_cover(int(now - window_s) // keys.ARM_BUCKET_S, int(now) // keys.ARM_BUCKET_S + 1, now)
        arms = await self._arms()
        read = await self._read_arms(arms, buckets)
        return {a: ArmBucket(sum(x.impressions for x in read[a]), sum(x.clicks for x in read[a]),
                             sum(x.value for x in read[a]), sum(x.value_sq for x in read[a])) for a in arms}

    async def recent_dead_letters(self, n: int = 5) -> list[dict[str, Any]]:
        """The newest ``n`` dead letters noted by ``note_dead_letters``, newest first."""
        return [orjson.loads(x) for x in cast(list[bytes], await self.r.lrange(keys.DEAD_LETTERS_RECENT, 0, n - 1))]

    async def max_user_updates(self) -> int:
        """The most labelled impressions applied to any one user (for the DP accountant)."""
        return int(await self.r.zscore(keys.DP_MAX_UPDATES, "max") or 0)

    async def freshness(self) -> dict[int, int]:
        """Histogram of click → user-state latency: upper bound (ms) → count."""
        return {int(k): int(v) for k, v in (await self.r.hgetall(keys.FRESHNESS)).items()}


# --- worker heartbeats ----------------------------------------------------------------

# a worker's heartbeat and quality entries outlive it by this much, then the next writer drops them: the hashes hold
# the workers of the last day, not every process that ever ran
PROCESS_ENTRY_TTL_S = 24 * 3600.0


async def _prune_stale(r: Client, key: str, now: float, keep_s: float = PROCESS_ENTRY_TTL_S) -> int:
    """Drop the fields of a hash of per-process JSON entries (each with a ``ts``) older than ``keep_s``."""
    entries = cast(dict[bytes, bytes], await r.hgetall(key))
    stale = []
    for field_, value in entries.items():
        try:
            ts = float(orjson.loads(value).get("ts", 0.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            ts = 0.0  # not ours to read: written by something else, kept no longer than a stale one
        if now - ts > keep_s:
            stale.append(field_)
    if stale:
        await r.hdel(key, *stale)
    return len(stale)


class WorkerRegistry:
    """Heartbeats of the stream workers: when each was last alive, how many partitions it owns, its lag."""

    def __init__(self, r: Client) -> None:
        self.r = r

    async def beat(self, worker_id: str, partitions: int, now: float, lag: dict[str, int] | None = None) -> None:
        await self.r.hset(keys.WORKERS, worker_id, orjson.dumps({"ts": now, "partitions": partitions,
                                                                 "lag": lag or {}}))

    async def prune(self, now: float) -> int:
        """Forget the workers (heartbeats and quality entries) not heard of for ``PROCESS_ENTRY_TTL_S``."""
        return await _prune_stale(self.r, keys.WORKERS, now) + await _prune_stale(self.r, keys.QUALITY, now)

    async def alive(self, now: float, within_s: float = 5.0) -> dict[str, dict]:
        hashed = cast(dict[bytes, bytes], await self.r.hgetall(keys.WORKERS))
        beats = {k.decode(): orjson.loads(v) for k, v in hashed.items()}
        return {k: v for k, v in beats.items() if now - v["ts"] <= within_s}


# --- online quality (prequential, per worker) ------------------------------------------------


class QualityBoard:
    """Workers' rolling prediction quality, and drift flags that ask the learner for an early cycle."""

    def __init__(self, r: Client) -> None:
        self.r = r

    async def publish(self, worker_id: str, snapshot: dict, now: float, drifted: bool) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.QUALITY, worker_id, orjson.dumps({**snapshot, "ts": now}))
        if drifted:
            pipe.set(keys.DRIFT, repr(now))
        await pipe.execute()

    async def read(self, now: float, within_s: float = 60.0) -> dict:
        """Across live workers: examples, example-weighted AUC and log-loss, drifts, last drift time."""
        snaps = [orjson.loads(v) for v in (await self.r.hgetall(keys.QUALITY)).values()]
        snaps = [s for s in snaps if now - s["ts"] <= within_s and s["examples"]]
        last = await self.r.get(keys.DRIFT)
        out: dict = {"examples": sum(s["examples"] for s in snaps), "drifts": sum(s["drifts"] for s in snaps),
                     "last_drift_at": float(last) if last else None, "auc": None, "log_loss": None}
        for name in ("auc", "log_loss"):
            w = [(s[name], s["examples"]) for s in snaps if s[name] is not None]
            if w:
                out[name] = sum(v * n for v, n in w) / sum(n for _, n in w)
        return out

    async def drift_since(self, ts: float) -> bool:
        last = await self.r.get(keys.DRIFT)
        return last is not None and float(last) > ts


# --- model pointer -------------------------------------------------------------


class ModelPointer:
    """The manifest of the served model version (written by the learner only)."""

    def __init__(self, r: Client) -> None:
        self.r = r

    async def get(self) -> dict | None:
        blob = await self.r.get(keys.MODEL_CURRENT)
        return orjson.loads(blob) if blob else None

    async def set(self, manifest: dict) -> None:
        await self.r.set(keys.MODEL_CURRENT, orjson.dumps(manifest))


# --- resources ---------------------------------------------------------------

# above this share of maxmemory Redis is reported under pressure: at 100% it refuses writes and the workers stall
MEMORY_PRESSURE_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class MemoryUse:
    """Redis' memory as ``INFO memory`` reports it.

    Attributes
    ----------
    used : int
        ``used_memory``, bytes.
    maxmemory : int
        The ceiling, bytes; 0 when there is none.
    policy : str
        ``maxmemory_policy``: what Redis does at the ceiling. Only ``noeviction`` (refuse the write) keeps
        PrivAds' state whole; any other policy deletes keys, checkpoints and pending impressions among them.
    """

    used: int
    maxmemory: int
    policy: str

    @property
    def share(self) -> float | None:
        """``used / maxmemory``; None without a ceiling."""
        return self.used / self.maxmemory if self.maxmemory else None

    @property
    def evicts(self) -> bool:
        return self.policy != "noeviction"

    def pressure(self, threshold: float = MEMORY_PRESSURE_SHARE) -> str | None:
        """Why this is a problem (one line), or None: an evicting policy, or more than ``threshold`` of the ceiling."""
        if self.evicts:
            return (f"Redis' maxmemory-policy is {self.policy}: at its ceiling it deletes keys, PrivAds' checkpoints "
                    "and pending impressions among them; set it to noeviction")
        share = self.share
        if share is not None and share > threshold:
            return (f"Redis holds {self.used / 2**20:.1f} MiB of its maxmemory {self.maxmemory / 2**20:.1f} MiB "
                    f"({share:.0%}): at 100% it refuses writes and the workers stop committing until it has room")
        return None


def _memory_of(info: dict) -> MemoryUse:
    return MemoryUse(int(info["used_memory"]), int(info.get("maxmemory", 0)),
                     str(info.get("maxmemory_policy", "noeviction")))


async def memory_use(r: Client) -> MemoryUse:
    """Read Redis' memory use, ceiling and eviction policy (``INFO memory``: allowed where CONFIG is not).

    On a cluster, the fullest master's (the first to refuse writes), or the first evicting one.
    """
    if not isinstance(r, Cluster):
        return _memory_of(await r.info("memory"))
    per_node = await r.info("memory", target_nodes=Cluster.PRIMARIES)
    uses = [_memory_of(i) for i in per_node.values()]
    return max(uses, key=lambda u: (u.evicts, u.share or 0.0, u.used))


async def memory_pressure(r: Client, threshold: float = MEMORY_PRESSURE_SHARE) -> str | None:
    """Why Redis' memory is a problem now, in one line, or None (a readiness check can report it).

    None too for a Redis that denies ``INFO`` to PrivAds' user: nothing can be said (start-up logged it).
    """
    try:
        return (await memory_use(r)).pressure(threshold)
    except NoPermissionError:
        return None


async def refuse_evicting_redis(r: Client) -> MemoryUse | None:
    """Check at start-up that Redis never evicts a key; returns what it reported (None: not allowed to ask).

    Raises
    ------
    StartError
        When ``maxmemory-policy`` is anything but ``noeviction``: an evicting Redis loses
        checkpoints (the workers then replay and count events twice) and pending impressions
        (their labels are lost) without an error anywhere, so PrivAds does not start on one.
        A Redis that denies ``INFO`` to PrivAds' user cannot be checked: that is logged, loudly, and
        the start goes on.
    """
    try:
        use = await memory_use(r)
    except NoPermissionError as e:
        log.error(
            "cannot read Redis' maxmemory-policy (INFO memory: %s): make sure it is noeviction, or PrivAds' state "
            "may be evicted silently (README: Resource limits)", e)
        return None
    if use.evicts:
        raise StartError(f"refusing to start: Redis' maxmemory-policy is {use.policy}, which deletes keys at the "
                         "memory ceiling (PrivAds' checkpoints and pending impressions among them, silently); set "
                         "`maxmemory-policy noeviction` (CONFIG SET, and in its configuration) - at the ceiling "
                         "Redis then refuses writes, which PrivAds retries (README: Resource limits)")
    return use


# --- the dead letters' last reasons (the dashboard) ------------------------------------------------------------


async def note_dead_letters(r: Client, letters: Sequence[bytes], now: float | None = None) -> None:
    """Keep the newest dead letters' topic, offset and reason (``records.dead_letter``'s records; never their
    payloads) in ``keys.DEAD_LETTERS_RECENT``, the last ``keys.DEAD_LETTERS_KEPT`` of them."""
    if not letters:
        return
    now = time.time() if now is None else now
    entries = []
    for raw in letters:
        d = orjson.loads(raw)
        entries.append(orjson.dumps({"ts": now, "topic": d.get("topic"), "partition": d.get("partition"),
                                     "offset": d.get("offset"),
                                     "error": str(d.get("error", ""))[:keys.DEAD_LETTER_REASON_CHARS]}))
    pipe = r.pipeline(transaction=False)
    pipe.lpush(keys.DEAD_LETTERS_RECENT, *entries[-keys.DEAD_LETTERS_KEPT:])
    pipe.ltrim(keys.DEAD_LETTERS_RECENT, 0, keys.DEAD_LETTERS_KEPT - 1)
    await pipe.execute()

