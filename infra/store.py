"""Redis I/O for every piece of PrivAds state (key layout in ``infra.keys``).

Each store is a thin async wrapper: batching through pipelines, no maths. Who
may call the writing methods is fixed by DESIGN.md's ownership table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import orjson
import redis.asyncio as aioredis

from infra import keys
from streams.records import Ad, Click, Impression, Labelled


def connect(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=False, health_check_interval=10)


# --- dedupe ------------------------------------------------------------------


async def first_seen(r: aioredis.Redis, topic: str, event_ids: Sequence[str], ttl_s: float) -> list[bool]:
    """Mark event ids as seen; True for those never seen before (a duplicate is applied once)."""
    pipe = r.pipeline(transaction=False)
    for eid in event_ids:
        pipe.set(keys.seen(topic, eid), b"1", nx=True, ex=int(ttl_s))
    return [bool(x) for x in await pipe.execute()]


async def count_processed(r: aioredis.Redis, topic: str, n: int) -> None:
    """Events of ``topic`` consumed by the workers (for /metrics)."""
    if n:
        await r.hincrby(keys.STATS, f"processed:{topic}", n)


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

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r

    async def cached_embeddings(self, hashes: Sequence[str]) -> list[bytes | None]:
        if not hashes:
            return []
        return await self.r.mget([keys.embedding(h) for h in hashes])

    async def upsert(self, ads: Sequence[Ad], hashes: Sequence[str], new_embeddings: dict[str, np.ndarray]) -> None:
        """Store ads and any newly computed embeddings, then log the change (readers follow the log)."""
        pipe = self.r.pipeline(transaction=True)
        for h, vec in new_embeddings.items():
            pipe.set(keys.embedding(h), vec.astype("<f4").tobytes())
        for ad, h in zip(ads, hashes):
            pipe.hset(keys.ad(ad.ad_id), mapping={
                "text": ad.text, "bid": repr(float(ad.bid)), "category": ad.category or "",
                "active": "1" if ad.active else "0", "text_hash": h, "ts": repr(float(ad.ts)),
            })
            pipe.sadd(keys.ADS, ad.ad_id)
            pipe.xadd(keys.CATALOG_LOG, {"ad_id": ad.ad_id}, maxlen=1_000_000, approximate=True)
        await pipe.execute()

    async def all_ids(self) -> list[str]:
        return sorted(x.decode() for x in await self.r.smembers(keys.ADS))

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
        for a, h in zip(ad_ids, rows):
            if not h:
                continue
            entries.append(CatalogEntry(
                ad_id=a, text=h[b"text"].decode(), bid=float(h[b"bid"]),
                category=h[b"category"].decode() or None, active=h[b"active"] == b"1",
                text_hash=h[b"text_hash"].decode(),
            ))
        blobs = await self.cached_embeddings([e.text_hash for e in entries])
        kept = [(e, b) for e, b in zip(entries, blobs) if b is not None]
        if not kept:
            return [], np.zeros((0, 384), dtype=np.float32)
        return [e for e, _ in kept], np.stack([np.frombuffer(b, dtype="<f4") for _, b in kept])

    async def last_change(self) -> str:
        """Id of the newest catalog change ("0-0" when none)."""
        last = await self.r.xrevrange(keys.CATALOG_LOG, count=1)
        return last[0][0].decode() if last else "0-0"

    async def changes_since(
        self, change_id: str, block_ms: int | None = None, count: int = 10_000
    ) -> tuple[str, list[str]]:
        """Ad ids changed after ``change_id``; returns (newest change id, ad ids)."""
        res = await self.r.xread({keys.CATALOG_LOG: change_id}, count=count, block=block_ms)
        if not res:
            return change_id, []
        entries = res[0][1]
        return entries[-1][0].decode(), list(dict.fromkeys(f[b"ad_id"].decode() for _, f in entries))


# --- users -------------------------------------------------------------------


class UserStore:
    """Per-user posterior (mean, diagonal precision, count) and erasure tombstones."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r

    async def get_many(self, user_ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, int] | None]:
        if not user_ids:
            return []
        blobs = await self.r.mget([keys.user(u) for u in user_ids])
        return [keys.unpack_user(b) if b else None for b in blobs]

    async def put_many(self, states: dict[str, tuple[np.ndarray, np.ndarray, int]]) -> None:
        if states:
            await self.r.mset({keys.user(u): keys.pack_user(*s) for u, s in states.items()})

    async def erased_at(self, user_ids: Sequence[str]) -> list[float | None]:
        if not user_ids:
            return []
        vals = await self.r.mget([f"erased:{u}" for u in user_ids])
        return [float(v) if v else None for v in vals]

    async def erase(self, user_id: str, now: float, ttl_s: float) -> None:
        """Delete the user's state; events already in flight for it are then ignored."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.user(user_id))
        pipe.set(f"erased:{user_id}", repr(now), ex=int(ttl_s))
        await pipe.execute()

    async def exists(self, user_id: str) -> bool:
        return bool(await self.r.exists(keys.user(user_id)))


# --- attribution and arm counters --------------------------------------------

_impression_encoder = msgspec.json.Encoder()


class AttributionStore:
    """Pending impressions awaiting their clicks, and the per-arm counters for /lift."""

    def __init__(self, r: aioredis.Redis, window_s: float) -> None:
        self.r = r
        self.window_s = window_s
        self.ttl = int(window_s) + 600

    async def add_impressions(self, imps: Sequence[Impression]) -> list[Labelled]:
        """Record impressions; returns positives for clicks that arrived before them."""
        pipe = self.r.pipeline(transaction=False)
        for imp in imps:
            pending = Labelled(impression_id=imp.event_id, user_id=imp.user_id, ad_id=imp.ad_id, ts=imp.ts,
                               clicked=False, policy=imp.policy, position=imp.position, propensity=imp.propensity)
            pipe.set(keys.impression(imp.event_id), _impression_encoder.encode(pending), ex=self.ttl)
            pipe.zadd(keys.PENDING, {imp.event_id: imp.ts})
            pipe.hincrby(keys.arm(imp.policy, int(imp.ts) // keys.ARM_BUCKET_S), "impressions", 1)
            pipe.sadd("arms", imp.policy)
            pipe.get(keys.orphan(imp.event_id))
        res = await pipe.execute()
        early = [(imp, res[i * 5 + 4]) for i, imp in enumerate(imps) if res[i * 5 + 4] is not None]
        out = []
        for imp, blob in early:
            click = msgspec.json.decode(blob, type=Click)
            labelled = await self._claim_click(imp.event_id, click.value)
            if labelled is not None:
                out.append(labelled)
            await self.r.delete(keys.orphan(imp.event_id))
            await self.r.hincrby(keys.STATS, "clicks_unattributed", -1)
        return out

    async def _claim_click(self, impression_id: str, value: float | None) -> Labelled | None:
        """Turn a pending impression into a positive, once (ZREM is the claim)."""
        if not await self.r.zrem(keys.PENDING, impression_id):
            return None
        blob = await self.r.get(keys.impression(impression_id))
        if blob is None:
            return None
        pending = msgspec.json.decode(blob, type=Labelled)
        await self.r.hincrby(keys.arm(pending.policy, int(pending.ts) // keys.ARM_BUCKET_S), "clicks", 1)
        return msgspec.structs.replace(pending, clicked=True, value=value or 0.0)

    async def add_clicks(self, clicks: Sequence[Click]) -> list[Labelled]:
        """Join clicks with their impressions; returns the positives."""
        out = []
        for click in clicks:
            if await self.r.exists(keys.impression(click.impression_id)):
                labelled = await self._claim_click(click.impression_id, click.value)
                if labelled is None:
                    await self.r.hincrby(keys.STATS, "clicks_repeated_or_late", 1)
                else:
                    out.append(labelled)
            else:
                await self.r.set(keys.orphan(click.impression_id), msgspec.json.encode(click), ex=self.ttl)
                await self.r.hincrby(keys.STATS, "clicks_unattributed", 1)
        return out

    async def close_windows(self, now: float, limit: int = 10_000) -> list[Labelled]:
        """Negatives for impressions whose attribution window closed without a click."""
        due = await self.r.zrangebyscore(keys.PENDING, "-inf", now - self.window_s, start=0, num=limit)
        if not due:
            return []
        pipe = self.r.pipeline(transaction=False)
        for iid in due:
            pipe.zrem(keys.PENDING, iid)
        claimed = [iid.decode() for iid, ok in zip(due, await pipe.execute()) if ok]
        if not claimed:
            return []
        blobs = await self.r.mget([keys.impression(i) for i in claimed])
        await self.r.delete(*[keys.impression(i) for i in claimed])
        return [msgspec.json.decode(b, type=Labelled) for b in blobs if b is not None]

    async def stats(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in (await self.r.hgetall(keys.STATS)).items()}

    async def arm_counts(self, window_s: float, now: float | None = None) -> dict[str, dict[str, int]]:
        """Impressions and clicks per arm for impressions in the last ``window_s`` seconds."""
        now = time.time() if now is None else now
        first, last = int(now - window_s) // keys.ARM_BUCKET_S, int(now) // keys.ARM_BUCKET_S
        arms = sorted(a.decode() for a in await self.r.smembers("arms"))
        pipe = self.r.pipeline(transaction=False)
        for a in arms:
            for b in range(first, last + 1):
                pipe.hgetall(keys.arm(a, b))
        res = iter(await pipe.execute())
        out = {}
        for a in arms:
            imps = clicks = 0
            for _ in range(first, last + 1):
                h = next(res)
                imps += int(h.get(b"impressions", 0))
                clicks += int(h.get(b"clicks", 0))
            out[a] = {"impressions": imps, "clicks": clicks}
        return out


# --- worker heartbeats ----------------------------------------------------------------


class WorkerRegistry:
    """Heartbeats of the stream workers: when each was last alive and how many partitions it owns."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r

    async def beat(self, worker_id: str, partitions: int, now: float) -> None:
        await self.r.hset(keys.WORKERS, worker_id, orjson.dumps({"ts": now, "partitions": partitions}))

    async def alive(self, now: float, within_s: float = 5.0) -> dict[str, dict]:
        beats = {k.decode(): orjson.loads(v) for k, v in (await self.r.hgetall(keys.WORKERS)).items()}
        return {k: v for k, v in beats.items() if now - v["ts"] <= within_s}


# --- model pointer -------------------------------------------------------------


class ModelPointer:
    """The manifest of the served model version (written by the learner only)."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r

    async def get(self) -> dict | None:
        blob = await self.r.get(keys.MODEL_CURRENT)
        return orjson.loads(blob) if blob else None

    async def set(self, manifest: dict) -> None:
        await self.r.set(keys.MODEL_CURRENT, orjson.dumps(manifest))
