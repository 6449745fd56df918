"""Redis key layout and the packed user-state value, defined once.

| key | type | owner |
| --- | --- | --- |
| ``u:{user_id}`` | packed user state (see ``pack_user``) | stream workers |
| ``seen:{p}`` | zset user id → when its state last changed: idle users expire (``USER_IDLE_S``) | owner of p |
| ``pop:{p}`` | float64: Σ of partition p's learned users' means, then their number | owner of p; erasure subtracts |
| ``ckpt:{p}`` | hash: input offset per topic, ``seq`` (bumped by every writer), clock, closed buckets | owner of p |
| ``pb:{p}`` | set of pending-bucket indexes of partition p | partition p's owner |
| ``pend:{p}:{b}`` | hash impression id → packed ``Pending``, bucket b, TTL | partition p's owner |
| ``orph:{p}`` | hash impression id → packed click that came before its impression | partition p's owner |
| ``arch:{p}`` | stream: one entry per batch (new impressions, labels) for the Parquet archive | partition p's owner |
| ``erased:{hash(user_id)}`` | when the user was erased; older events are ignored; no TTL (``UserStore.erase``) | API |
| ``erasures`` | zset hash(user_id) → erased at, until the archive's compaction drops the rows | API; learner |
| ``erasing:{p}`` | zset user id → erased at, until p's owner scrubbed its pending events (a second) | API; worker |
| ``arm:{policy}:{bucket}`` | hash impressions/clicks per minute bucket, kept 8 days | stream workers |
| ``armh:{policy}:{hour}``, ``armd:{policy}:{day}`` | the same, per hour (kept 93 days), per day (400) | workers |
| ``adstat:{policy}:{what}`` | hash ad id → clicks / shown / labelled / expected (µ-clicks), in one arm | workers |
| ``adstat:log`` | stream: the increments of ``adstat:*`` per committed batch, kept ``ADSTAT_LOG_HORIZON_S`` | workers |
| ``dp:max_updates`` | zset: the most updates any one user has had (DP accountant) | stream workers |
| ``fresh`` | hash histogram of click → user-state latency (ms bucket → count) | stream workers |
| ``stats`` | hash of global counters (unattributed clicks, …) | stream workers |
| ``ad:{ad_id}`` | hash text/bid/category/active/text_hash/ts | catalog agent |
| ``emb:{text_hash}`` | float32 MiniLM embedding, the text-hash cache | catalog agent; the learner drops unused ones |
| ``embunused`` | zset text hash → first seen unused by any ad (``CatalogStore.drop_unused_embeddings``) | learner |
| ``ads`` | set of all ad ids | catalog agent |
| ``catalog:log`` | stream of catalog changes (``ad_id``) | catalog agent |
| ``workers`` | hash worker id → last heartbeat (ts, partitions owned, consumer lag per topic) | stream workers |
| ``quality`` | hash worker id → rolling AUC / log-loss of served predictions, drifts | stream workers |
| ``learner:drift`` | when drift was last detected: the learner runs a cycle early | stream workers |
| ``secret:impressions`` | 32 random bytes signing impression ids (``infra.secret``) | the first API process (SET NX) |
| ``model:current`` | JSON manifest of the served model version | learner |
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

USER_PREFIX = "u:"
FRESHNESS = "fresh"
PARTITIONS = "partitions"
DP_MAX_UPDATES = "dp:max_updates"
QUALITY = "quality"
DRIFT = "learner:drift"
ADS = "ads"
CATALOG_LOG = "catalog:log"
MODEL_CURRENT = "model:current"
STATS = "stats"
WORKERS = "workers"
ARM_BUCKET_S = 60
ARM_TTL_S = 8 * 24 * 3600  # per-minute arm counters: the edges of a window up to a week old are exact to the minute
# each arm's counts are kept per minute, hour and day (span s → key prefix, kept this long after the last write), so
# that a window of any length is read from a bounded number of buckets (``arm_cover``)
ARM_SPANS: dict[int, tuple[str, int]] = {
    ARM_BUCKET_S: ("arm", ARM_TTL_S),
    3600: ("armh", 93 * 24 * 3600),
    86400: ("armd", 400 * 24 * 3600),
}
ARM_TTLS = {prefix + ":": ttl for prefix, ttl in ARM_SPANS.values()}
# /lift windows are capped at a year: their start is still within the daily roll-ups' life
ARM_MAX_WINDOW_S = 366 * 24 * 3600
ADSTAT_LOG = "adstat:log"
ADSTAT_LOG_HORIZON_S = 600  # a reader that fell further behind than this re-reads the hashes
# what the API follows per ad: clicks and shown (the popularity control's Beta), and the clicks the served model
# predicted, in millionths so that Redis adds them exactly (the calibration factor's Gamma)
AD_COUNT_FIELDS = ("clicks", "shown", "expected")
ADSTAT_FIELDS = ("clicks", "labelled", "shown", "expected")
EXPECTED_SCALE = 1_000_000


def user(user_id: str) -> str:
    return USER_PREFIX + user_id


def checkpoint(partition: int) -> str:
    return f"ckpt:{partition}"


def buckets(partition: int) -> str:
    return f"pb:{partition}"


def pending(partition: int, bucket: int) -> str:
    return f"pend:{partition}:{bucket}"


def orphans(partition: int) -> str:
    return f"orph:{partition}"


def archive(partition: int) -> str:
    return f"arch:{partition}"


def seen(partition: int) -> str:
    """When each user of partition p last changed (zset): the workers forget the idle ones."""
    return f"seen:{partition}"


def population(partition: int) -> str:
    """The sum of the learned users' means of one partition, and how many (``pack_population``)."""
    return f"pop:{partition}"


def pack_population(total: np.ndarray, users: int) -> bytes:
    """A partition's population sum: float64 (D) then the user count as float64."""
    return np.r_[np.asarray(total, "<f8"), float(users)].astype("<f8").tobytes()


def unpack_population(blob: bytes) -> tuple[np.ndarray, int]:
    v = np.frombuffer(blob, dtype="<f8")
    return v[:-1].copy(), int(round(v[-1]))


def user_hash(user_id: str) -> str:
    """A user id's hash (blake2b, 16 bytes, hex): how erasure names a user without keeping the id in clear."""
    return hashlib.blake2b(user_id.encode(), digest_size=16).hexdigest()


def erased(user_id: str) -> str:
    """The erasure tombstone's key: a hash, so that an erased id is not left in Redis in clear."""
    return "erased:" + user_hash(user_id)


ERASURES = "erasures"  # zset user_hash → erased at: the erasures the archive's compaction has yet to apply


def erasing(partition: int) -> str:
    """Zset user id → erased at: erasures whose pending events the partition's owner has yet to scrub."""
    return f"erasing:{partition}"


def arm(policy: str, bucket: int, span: int = ARM_BUCKET_S) -> str:
    """One arm's counts for bucket ``bucket`` of ``span`` seconds (a key of ``ARM_SPANS``)."""
    return f"{ARM_SPANS[span][0]}:{policy}:{bucket}"


def arm_rollup(policy: str, minute: int) -> list[str]:
    """The counters one event of minute ``minute`` (Unix seconds // 60) counts in: its minute, hour and day."""
    return [arm(policy, minute * ARM_BUCKET_S // span, span) for span in ARM_SPANS]


def arm_ttl(key: str) -> int | None:
    """How long an arm counter is kept after its last write; None for any other key."""
    head = key[:key.find(":") + 1]
    return ARM_TTLS.get(head)


def arm_cover(first: int, end: int, now: float) -> list[tuple[int, int]]:
    """The fewest arm buckets (span, index) that tile the minutes ``[first, end)``.

    Greedy: from each point, the largest span aligned there that still fits. A window of any length takes at most
    59 + 23 minute and hour buckets at each edge plus one per day. A start older than a span's life moves back to
    the start of the next span up (so the window may begin up to an hour, or a day, early), since the buckets that
    would tile it exactly have expired.

    Parameters
    ----------
    first, end : int
        Minute indexes (Unix seconds // 60), ``end`` exclusive.
    now : float
        Unix seconds: decides which spans are still kept.
    """
    spans = sorted(ARM_SPANS)  # seconds, finest first
    for finer, coarser in zip(spans, spans[1:], strict=False):
        # each finer bucket lives its TTL after its last write, which is after its start
        if first * ARM_BUCKET_S < now - ARM_SPANS[finer][1] + finer:
            first -= first % (coarser // ARM_BUCKET_S)
    out: list[tuple[int, int]] = []
    i = first
    while i < end:
        for span in reversed(spans):
            m = span // ARM_BUCKET_S
            if i % m == 0 and i + m <= end:
                out.append((span, i // m))
                i += m
                break
    return out


def adstat(policy: str, what: str) -> str:
    """Per-ad counts (``what``: clicks | labelled) of one arm: each arm learns from its own traffic only."""
    return f"adstat:{policy}:{what}"


def parse_adstat(key: str) -> tuple[str, str] | None:
    """``(policy, what)`` of an ``adstat`` hash key; None for any other key (and for the log)."""
    head, sep, rest = key.partition(":")
    if head != "adstat" or not sep:
        return None
    policy, sep, what = rest.rpartition(":")
    return (policy, what) if sep and what in ADSTAT_FIELDS else None


def ad(ad_id: str) -> str:
    return "ad:" + ad_id


EMBEDDING_PREFIX = "emb:"
EMBEDDINGS_UNUSED = "embunused"  # not under emb:, which a scan of the embeddings must not see


def embedding(text_hash: str) -> str:
    return EMBEDDING_PREFIX + text_hash


# --- user state ---------------------------------------------------------------

_HEADER = struct.Struct("<I")  # count of labelled impressions applied


def pack_user(mean: np.ndarray, precision: np.ndarray, count: int) -> bytes:
    """Pack a user's posterior: header + mean (float32, D) + precision (float32, D)."""
    return _HEADER.pack(count) + mean.astype("<f4").tobytes() + precision.astype("<f4").tobytes()


def unpack_user(blob: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """Inverse of ``pack_user``: (mean (D,), precision (D,), count)."""
    (count,) = _HEADER.unpack_from(blob)
    body = np.frombuffer(blob, dtype="<f4", offset=_HEADER.size)
    d = body.size // 2
    return body[:d].copy(), body[d:].copy(), count
