"""Redis key layout and the packed user-state value, defined once.

| key | type | owner |
| --- | --- | --- |
| ``u:{user_id}`` | packed user state (see ``pack_user``) | stream workers |
| ``imp:{impression_id}`` | pending impression (JSON), TTL = window + margin | stream workers |
| ``pending`` | zset impression_id → ts, impressions awaiting their window | stream workers |
| ``orphan:{impression_id}`` | click that arrived before its impression, TTL | stream workers |
| ``seen:{topic}:{event_id}`` | dedupe marker, TTL | stream workers |
| ``arm:{policy}:{bucket}`` | hash impressions/clicks per minute bucket | stream workers |
| ``stats`` | hash of global counters (unattributed clicks, …) | stream workers |
| ``ad:{ad_id}`` | hash text/bid/category/active/text_hash/ts | catalog agent |
| ``emb:{text_hash}`` | float32 MiniLM embedding, the text-hash cache | catalog agent |
| ``ads`` | set of all ad ids | catalog agent |
| ``catalog:log`` | stream of catalog changes (``ad_id``) | catalog agent |
| ``workers`` | hash worker id → last heartbeat (ts, partitions owned) | stream workers |
| ``model:current`` | JSON manifest of the served model version | learner |
"""

from __future__ import annotations

import struct

import numpy as np

USER_PREFIX = "u:"
PENDING = "pending"
ADS = "ads"
CATALOG_LOG = "catalog:log"
MODEL_CURRENT = "model:current"
STATS = "stats"
WORKERS = "workers"
ARM_BUCKET_S = 60


def user(user_id: str) -> str:
    return USER_PREFIX + user_id


def impression(impression_id: str) -> str:
    return "imp:" + impression_id


def orphan(impression_id: str) -> str:
    return "orphan:" + impression_id


def seen(topic: str, event_id: str) -> str:
    return f"seen:{topic}:{event_id}"


def arm(policy: str, bucket: int) -> str:
    return f"arm:{policy}:{bucket}"


def ad(ad_id: str) -> str:
    return "ad:" + ad_id


def embedding(text_hash: str) -> str:
    return "emb:" + text_hash


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
