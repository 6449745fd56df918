"""Redis key layout and the packed user-state value, defined once.

Every key one worker transaction touches shares a Redis Cluster hash slot: the keys of partition p carry the hash
tag ``{p}`` (the user states too: ``u:{p}:id``, p the user's partition), the counters every partition adds to carry
``{g}`` and the catalog ``{c}``. On one redis-server the tags change nothing; on a cluster they put each partition's
state on one node and let its commit be one MULTI/EXEC (``PartitionStore.commit``). The global counters cannot join a
partition's transaction there: the commit appends them to the partition's outbox ``out:{p}`` and ``PartitionStore.fold``
moves them into the ``{g}`` keys exactly once.

| key | type | owner |
| --- | --- | --- |
| ``u:{p}:{user_id}`` | packed user state: posterior and per-category tastes (see ``pack_user``) | stream workers |
| ``seen:{p}`` | zset user id → when its state last changed: idle users expire (``USER_IDLE_S``) | owner of p |
| ``pop:{p}`` | float64: Σ of partition p's learned users' means, then their number | owner of p; erasure subtracts |
| ``ckpt:{p}`` | hash: offset per topic, ``seq`` (bumped by each writer), clock, closed buckets, fence | owner of p |
| ``pb:{p}`` | set of pending-bucket indexes of partition p | partition p's owner |
| ``pend:{p}:{b}`` | hash impression id → packed ``Pending``, bucket b, TTL | partition p's owner |
| ``orph:{p}`` | hash impression id → packed click that came before its impression | partition p's owner |
| ``arch:{p}`` | stream: one entry per batch (new impressions, labels) for the Parquet archive | partition p's owner |
| ``out:{p}`` | stream: on a cluster, a batch's global counter increments until ``PartitionStore.fold`` | owner of p |
| ``erased:{p}:{hash(user_id)}`` | erased at: older events are ignored; no TTL (``UserStore.erase``) | API |
| ``erasures:{p}`` | zset hash(user_id) → erased at, until the archive's compaction drops the rows | API; learner |
| ``erasing:{p}`` | zset user id → erased at, until p's owner scrubbed its pending events (a second) | API; worker |
| ``arm:{g}:{policy}:{bucket}`` | hash impressions, clicks, value:sum, value:sq per minute, kept 8 days | workers |
| ``armh:{g}:…``, ``armd:{g}:…`` | the same, per hour (kept 93 days), per day (400) | workers |
| ``arms:{g}`` | set of the arms (policies) ever counted | workers |
| ``adstat:{g}:{policy}:{what}`` | hash ad id → clicks / shown / labelled / expected (µ-clicks), in one arm | workers |
| ``adstat:{g}:log`` | stream: the increments of ``adstat:*`` per batch, kept ``ADSTAT_LOG_HORIZON_S`` | workers |
| ``folded:{g}`` | hash partition → the last ``out:{p}`` entry folded into the ``{g}`` keys (cluster only) | workers |
| ``deadletters:recent`` | list: the newest dead letters' topic, offset and reason (no payload) | workers |
| ``dp:max_updates:{g}`` | zset: the most updates any one user has had (DP accountant) | stream workers |
| ``fresh:{g}`` | hash histogram of click → user-state latency (ms bucket → count) | stream workers |
| ``stats:{g}`` | hash of global counters (unattributed clicks, …) | stream workers |
| ``ad:{c}:{ad_id}`` | hash text/bid/category/active/text_hash/ts | catalog agent |
| ``emb:{c}:{text_hash}`` | float32 MiniLM embedding of an ``encoder_input`` | catalog agent; the learner drops it |
| ``embunused:{c}`` | zset text hash → first seen unused by any ad (``CatalogStore.drop_unused_embeddings``) | learner |
| ``ads:{c}`` | set of all ad ids | catalog agent |
| ``catalog:log:{c}`` | stream of catalog changes (``ad_id``) | catalog agent |
| ``partitions`` | the partition count the workers run with | stream workers |
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

from privads.infra.partitioning import owner

GLOBAL = "{g}"  # the hash tag of the counters every partition adds to
CATALOG = "{c}"  # the catalog's hash tag: an upsert writes the ad, its embedding and the change log at once
USER_PREFIX = "u:"
FRESHNESS = "fresh:" + GLOBAL
PARTITIONS = "partitions"
DP_MAX_UPDATES = "dp:max_updates:" + GLOBAL
QUALITY = "quality"
DRIFT = "learner:drift"
ADS = "ads:" + CATALOG
CATALOG_LOG = "catalog:log:" + CATALOG
MODEL_CURRENT = "model:current"
STATS = "stats:" + GLOBAL
ARMS = "arms:" + GLOBAL
FOLDED = "folded:" + GLOBAL
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
ADSTAT_LOG = "adstat:" + GLOBAL + ":log"
ADSTAT_LOG_HORIZON_S = 600  # a reader that fell further behind than this re-reads the hashes
# what the API follows per ad: clicks and shown (the popularity control's Beta), and the clicks the served model
# predicted, in millionths so that Redis adds them exactly (the calibration factor's Gamma)
AD_COUNT_FIELDS = ("clicks", "shown", "expected")
ADSTAT_FIELDS = ("clicks", "labelled", "shown", "expected")
EXPECTED_SCALE = 1_000_000


def tag(partition: int) -> str:
    """Partition p's hash tag, ``{p}``: every key of p's state lives in the Redis Cluster slot it names."""
    return f"{{{partition}}}"


def user_in(user_id: str, partition: int) -> str:
    """The state key of a user of partition ``partition`` (the caller knows it: ``user`` computes it)."""
    return f"{USER_PREFIX}{tag(partition)}:{user_id}"


def user(user_id: str, partitions: int) -> str:
    """A user's state key, in the slot of the partition that owns the user among ``partitions``."""
    return user_in(user_id, owner(user_id.encode(), partitions))


def user_id_of(key: bytes | str) -> str:
    """The user id of a state key (``user_in``'s inverse)."""
    k = key.decode() if isinstance(key, bytes) else key
    return k[k.index("}:") + 2:]


def checkpoint(partition: int) -> str:
    return f"ckpt:{tag(partition)}"


def buckets(partition: int) -> str:
    return f"pb:{tag(partition)}"


def pending(partition: int, bucket: int) -> str:
    return f"pend:{tag(partition)}:{bucket}"


def orphans(partition: int) -> str:
    return f"orph:{tag(partition)}"


def archive(partition: int) -> str:
    return f"arch:{tag(partition)}"


def outbox(partition: int) -> str:
    """Partition p's batches' global counter increments, waiting to be folded into the ``{g}`` keys (cluster)."""
    return f"out:{tag(partition)}"


def seen(partition: int) -> str:
    """When each user of partition p last changed (zset): the workers forget the idle ones."""
    return f"seen:{tag(partition)}"


def population(partition: int) -> str:
    """The sum of the learned users' means of one partition, and how many (``pack_population``)."""
    return f"pop:{tag(partition)}"


def pack_population(total: np.ndarray, users: int) -> bytes:
    """A partition's population sum: float64 (D) then the user count as float64."""
    return np.r_[np.asarray(total, "<f8"), float(users)].astype("<f8").tobytes()


def unpack_population(blob: bytes) -> tuple[np.ndarray, int]:
    v = np.frombuffer(blob, dtype="<f8")
    return v[:-1].copy(), int(round(v[-1]))


def user_hash(user_id: str) -> str:
    """A user id's hash (blake2b, 16 bytes, hex): how erasure names a user without keeping the id in clear."""
    return hashlib.blake2b(user_id.encode(), digest_size=16).hexdigest()


def erased(user_id: str, partitions: int) -> str:
    """The erasure tombstone's key, in the user's partition's slot: a hash, so that an erased id is not left in
    Redis in clear."""
    return f"erased:{tag(owner(user_id.encode(), partitions))}:{user_hash(user_id)}"


def erasures(partition: int) -> str:
    """Zset user_hash → erased at: partition p's erasures the archive's compaction has yet to apply."""
    return f"erasures:{tag(partition)}"


def erasing(partition: int) -> str:
    """Zset user id → erased at: erasures whose pending events the partition's owner has yet to scrub."""
    return f"erasing:{tag(partition)}"


# the dashboard's "last reasons" of the dead letters: topic, offset and reason of the newest few, never a payload;
# written beside the dead-letter topic (best effort: observability, not state)
DEAD_LETTERS_RECENT = "deadletters:recent"
DEAD_LETTERS_KEPT = 20
DEAD_LETTER_REASON_CHARS = 200

# an arm bucket's float fields (HINCRBYFLOAT): the sum of its clicks' values and of their squares. Floats, not fixed
# point: a value has no bound, and a fixed-point square would overflow Redis' 64-bit integers at values of ~3,000
ARM_VALUE, ARM_VALUE_SQ = "value:sum", "value:sq"
ARM_VALUE_FIELDS = (ARM_VALUE, ARM_VALUE_SQ)


def arm(policy: str, bucket: int, span: int = ARM_BUCKET_S) -> str:
    """One arm's counts for bucket ``bucket`` of ``span`` seconds (a key of ``ARM_SPANS``)."""
    return f"{ARM_SPANS[span][0]}:{GLOBAL}:{policy}:{bucket}"


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


def entry_after(entry_id: str) -> str:
    """The smallest stream entry id after ``entry_id`` ("ms-seq"): an exact ``XTRIM MINID`` drops up to it."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def adstat(policy: str, what: str) -> str:
    """Per-ad counts (``what``: clicks | labelled) of one arm: each arm learns from its own traffic only."""
    return f"adstat:{GLOBAL}:{policy}:{what}"


def parse_adstat(key: str) -> tuple[str, str] | None:
    """``(policy, what)`` of an ``adstat`` hash key; None for any other key (and for the log)."""
    head = f"adstat:{GLOBAL}:"
    if not key.startswith(head):
        return None
    policy, sep, what = key[len(head):].rpartition(":")
    return (policy, what) if sep and what in ADSTAT_FIELDS else None


def ad(ad_id: str) -> str:
    return f"ad:{CATALOG}:{ad_id}"


EMBEDDING_PREFIX = f"emb:{CATALOG}:"
EMBEDDINGS_UNUSED = "embunused:" + CATALOG  # not under emb:{c}:, which a scan of the embeddings must not see


def embedding(text_hash: str) -> str:
    return EMBEDDING_PREFIX + text_hash


# --- user state ---------------------------------------------------------------

_HEADER = struct.Struct("<I")  # count of labelled impressions applied
_TASTES_N = struct.Struct("<I")  # the number of taste entries, last in a blob that has them
# one entry per category the user was shown: its stable hash (``category_hash``), the user's clicks on its ads,
# the clicks the population-level model expected of those impressions, and the impressions
TASTE_DTYPE = np.dtype([("hash", "<u4"), ("clicks", "<f4"), ("expected", "<f4"), ("shown", "<f4")])


def category_hash(category: str | None) -> int:
    """A category's stable 32-bit id in the user state (0: no category; never Python's salted ``hash``)."""
    if not category:
        return 0
    return int.from_bytes(hashlib.blake2b(category.encode(), digest_size=4).digest(), "little") or 1


def no_tastes() -> np.ndarray:
    """An empty taste table (``TASTE_DTYPE``, shape (0,))."""
    return np.zeros(0, TASTE_DTYPE)


def pack_user(mean: np.ndarray, precision: np.ndarray, count: int, tastes: np.ndarray | None = None) -> bytes:
    """Pack a user's posterior: header + mean (float32, D) + precision (float32, D) [+ tastes].

    ``tastes`` (``TASTE_DTYPE``, sorted by hash) follow as 16-byte entries, then their
    number as a uint32. A blob without them is ``4 + 8·D`` bytes, one with them
    ``4 + 8·D + 16·n + 4``: the length modulo 8 (0 or 4) says which, so states
    written before tastes existed read as they did.
    """
    blob = _HEADER.pack(count) + mean.astype("<f4").tobytes() + precision.astype("<f4").tobytes()
    if tastes is None or tastes.size == 0:
        return blob
    return blob + np.asarray(tastes, TASTE_DTYPE).tobytes() + _TASTES_N.pack(tastes.size)


def _tastes_start(blob: bytes) -> tuple[int, int]:
    """Where the tastes start in a packed state, and how many there are (``len(blob)``, 0 without)."""
    if (len(blob) - _HEADER.size) % 8 == 0:
        return len(blob), 0
    (n,) = _TASTES_N.unpack_from(blob, len(blob) - _TASTES_N.size)
    return len(blob) - _TASTES_N.size - n * TASTE_DTYPE.itemsize, n


def unpack_user(blob: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """Inverse of ``pack_user``: (mean (D,), precision (D,), count)."""
    (count,) = _HEADER.unpack_from(blob)
    end, _ = _tastes_start(blob)
    body = np.frombuffer(blob[:end], dtype="<f4", offset=_HEADER.size)
    d = body.size // 2
    return body[:d].copy(), body[d:].copy(), count


MAX_TASTES = 64  # categories kept per user: past it, the ones with the least expected clicks make room


def window_tastes(tastes: np.ndarray, window: float) -> np.ndarray:
    """``tastes`` with each entry past ``window`` impressions scaled back to ``window`` (in place; returned).

    A category's clicks, expected clicks and impressions are multiplied by
    ``window / shown`` once it has been shown more than ``window`` times: their
    ratio (the user's factor on it) is kept, their weight is capped, so a taste
    that changes is followed within about ``window`` of its impressions. The cap
    on a Beta's α + β of Dynamic Thompson Sampling (Gupta, Granmo & Agrawala,
    2011), applied to the Gamma's counts. ``window`` 0: never.

    Parameters
    ----------
    tastes : ndarray of ``TASTE_DTYPE``, shape (n,)
    window : float
    """
    scale = window_scale(tastes["shown"], window)
    if (scale < 1).any():
        for name in ("clicks", "expected", "shown"):
            tastes[name] *= scale
    return tastes


def window_scale(shown: np.ndarray, window: float) -> np.ndarray:
    """What each taste's counts are multiplied by (``window_tastes``): ``min(1, window / shown)``, 1 if ``window``
    is 0. ``shown``: any shape; the result has its shape and float type (float32 from the tastes' float32)."""
    shown = np.asarray(shown)
    shown = shown.astype(np.result_type(shown.dtype, np.float32), copy=False)
    if window <= 0:
        return np.ones_like(shown)
    w = shown.dtype.type(window)
    return w / np.maximum(shown, w)


def merge_tastes(tastes: np.ndarray, hashes: np.ndarray, clicks: np.ndarray, expected: np.ndarray,
                 shown: np.ndarray, cap: int = MAX_TASTES, window: float = 0.0) -> np.ndarray:
    """``tastes`` with each event's counts added to its category's entry (new entries for new categories).

    Parameters
    ----------
    tastes : ndarray of ``TASTE_DTYPE``, shape (n,)
        Sorted by hash.
    hashes : ndarray of uint32, shape (m,)
        Each event's category (``category_hash``; 0, no category, is skipped).
    clicks, expected, shown : ndarray, shape (m,)
        What each event adds.
    cap : int
        Entries kept; the ones with the least ``expected`` (the least evidence) go first.
    window : float
        Impressions a category's entry weighs at most, after the events are added (``window_tastes``).

    Returns
    -------
    ndarray of ``TASTE_DTYPE``, sorted by hash
    """
    return merge_tastes_many([tastes], np.zeros(np.shape(hashes)[0], np.int64), hashes, clicks, expected, shown,
                             cap, window)[0]


def merge_tastes_many(tastes: list[np.ndarray], user_index: np.ndarray, hashes: np.ndarray, clicks: np.ndarray,
                      expected: np.ndarray, shown: np.ndarray, cap: int = MAX_TASTES,
                      window: float = 0.0) -> list[np.ndarray]:
    """``merge_tastes`` for many users at once (one sort for a whole batch, not one per user).

    Parameters
    ----------
    tastes : list of ndarray of ``TASTE_DTYPE``, length U
        Each user's, sorted by hash.
    user_index : ndarray of int, shape (m,)
        Which user each event belongs to, in [0, U).
    hashes, clicks, expected, shown : ndarray, shape (m,)
        As in ``merge_tastes``.
    cap : int
    window : float

    Returns
    -------
    list of ndarray of ``TASTE_DTYPE``, length U
        A user without events gets their tastes back unchanged.
    """
    hashes = np.asarray(hashes, np.uint32)
    keep = hashes != 0
    user_index = np.asarray(user_index, np.int64)[keep]
    touched = np.unique(user_index)
    if touched.size == 0:
        return list(tastes)
    old = [tastes[u] for u in touched.tolist()]
    old_rows = np.repeat(touched, [t.size for t in old])
    old_all = np.concatenate(old) if old else np.zeros(0, TASTE_DTYPE)
    # one key per (user, category): the user in the high half, so a sort groups users and orders their hashes
    key = np.concatenate([(old_rows.astype(np.uint64) << np.uint64(32)) | old_all["hash"].astype(np.uint64),
                          (user_index.astype(np.uint64) << np.uint64(32)) | hashes[keep].astype(np.uint64)])
    uniq, inv = np.unique(key, return_inverse=True)
    merged = np.zeros(uniq.size, TASTE_DTYPE)
    merged["hash"] = (uniq & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    for name, add in (("clicks", clicks), ("expected", expected), ("shown", shown)):
        both = np.concatenate([old_all[name].astype(np.float64), np.asarray(add, np.float64)[keep]])
        merged[name] = np.bincount(inv, weights=both, minlength=uniq.size)
    window_tastes(merged, window)
    owner_of = (uniq >> np.uint64(32)).astype(np.int64)
    bounds = np.searchsorted(owner_of, touched, side="right")
    out = list(tastes)
    for u, part in zip(touched.tolist(), np.split(merged, bounds[:-1]), strict=True):
        if part.size > cap:
            part = np.sort(part[np.argsort(-part["expected"], kind="stable")[:cap]], order="hash")
        out[u] = part
    return out


def taste_counts(tastes: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The user's clicks and expected clicks in each of ``hashes``' categories (0 where it has no entry).

    Parameters
    ----------
    tastes : ndarray of ``TASTE_DTYPE``, shape (n,), sorted by hash
    hashes : ndarray of uint32, shape (C,)

    Returns
    -------
    clicks, expected : ndarray, shape (C,)
    """
    hashes = np.asarray(hashes, np.uint32)
    clicks, expected = np.zeros(hashes.shape[0]), np.zeros(hashes.shape[0])
    if tastes.size == 0 or hashes.size == 0:
        return clicks, expected
    at = np.minimum(np.searchsorted(tastes["hash"], hashes), tastes.size - 1)
    hit = (tastes["hash"][at] == hashes) & (hashes != 0)
    clicks[hit], expected[hit] = tastes["clicks"][at[hit]], tastes["expected"][at[hit]]
    return clicks, expected


def unpack_tastes(blob: bytes) -> np.ndarray:
    """The tastes of a packed state (``TASTE_DTYPE``, sorted by hash; empty if it has none), a writable copy."""
    start, n = _tastes_start(blob)
    return np.frombuffer(blob, TASTE_DTYPE, count=n, offset=start).copy()
