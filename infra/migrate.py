"""The Redis key layout's version, and the move of an earlier layout's keys to the current one.

Layout 1 named keys without hash tags (``u:{user_id}``, ``ckpt:{p}``, ``stats``, …); layout 2 (``infra.keys``)
tags every key with its Redis Cluster slot: ``{p}`` for partition p's state, ``{g}`` for the global counters,
``{c}`` for the catalog. The workers and the API refuse a Redis that still holds layout 1
(``refuse_old_layout``); ``privads migrate-redis`` renames its keys, with PrivAds stopped.

An erasure tombstone of layout 1 is named by a hash of the user id, which does not tell the user's partition: it
is copied into every partition's slot, so that the erasure still holds whichever partition the user maps to.
"""

from __future__ import annotations

import re
from typing import cast

import redis

from privads.infra import keys
from privads.infra.errors import StartError
from privads.infra.store import Client

LAYOUT = "layout"  # the key holding the layout's version
VERSION = 2
# keys only layout 1 has: any of them means the Redis was written by an earlier PrivAds
_OLD_MARKERS = ("stats", "ads", "arms", "catalog:log", "ckpt:0")
_PARTITION = re.compile(r"^(ckpt|pb|orph|arch|seen|pop|erasing):(\d+)$")
_PENDING = re.compile(r"^pend:(\d+):(-?\d+)$")
_GLOBAL_SINGLES = {"stats": keys.STATS, "fresh": keys.FRESHNESS, "dp:max_updates": keys.DP_MAX_UPDATES,
                   "arms": keys.ARMS, "adstat:log": keys.ADSTAT_LOG}
_CATALOG_SINGLES = {"ads": keys.ADS, "catalog:log": keys.CATALOG_LOG, "embunused": keys.EMBEDDINGS_UNUSED}


def holds_old_layout(r: redis.Redis) -> bool:
    """Whether one redis-server holds layout 1 (and was not migrated)."""
    return r.get(LAYOUT) is None and bool(r.exists(*_OLD_MARKERS))


async def refuse_old_layout(r: Client) -> None:
    """Raise ``StartError`` (one line saying what to run) when ``r`` holds layout 1; else mark it as layout 2.

    The workers and the API call it at start-up: a process of this layout on layout-1 state would find no user,
    checkpoint or counter and start over, erasure tombstones included.
    """
    if await r.get(LAYOUT) is None and any([await r.exists(k) for k in _OLD_MARKERS]):
        raise StartError("refusing to start: this Redis holds PrivAds state in an earlier key layout (before the "
                         "Redis Cluster hash tags); stop every PrivAds process and run `privads migrate-redis` "
                         "(README: On a Redis Cluster)")
    await r.set(LAYOUT, VERSION, nx=True)


def new_name(key: str, partitions: int) -> list[str] | None:
    """The layout-2 name(s) of a layout-1 key; None for a key whose name did not change."""
    if key in _GLOBAL_SINGLES:
        return [_GLOBAL_SINGLES[key]]
    if key in _CATALOG_SINGLES:
        return [_CATALOG_SINGLES[key]]
    if key == "erasures":
        return [keys.erasures(p) for p in range(partitions)]
    if m := _PARTITION.match(key):
        return [f"{m[1]}:{keys.tag(int(m[2]))}"]
    if m := _PENDING.match(key):
        return [keys.pending(int(m[1]), int(m[2]))]
    head, sep, rest = key.partition(":")
    if not sep or rest.startswith(keys.GLOBAL) or rest.startswith(keys.CATALOG) or re.match(r"^\{\d+\}:", rest):
        return None  # a single key that kept its name, or one of layout 2 already
    if head == "u":
        return [keys.user(rest, partitions)]
    if head == "erased":
        return [f"erased:{keys.tag(p)}:{rest}" for p in range(partitions)]
    if head in ("arm", "armh", "armd"):
        return [f"{head}:{keys.GLOBAL}:{rest}"]
    if head == "adstat":
        return [f"adstat:{keys.GLOBAL}:{rest}"]
    if head == "ad":
        return [keys.ad(rest)]
    if head == "emb":
        return [keys.embedding(rest)]
    return None


def migrate(r: redis.Redis, partitions: int) -> dict[str, int]:
    """Rename every layout-1 key of ``r`` (one redis-server: layout 1 never ran on a cluster) to layout 2.

    Run it with PrivAds stopped. A key with several new names (a tombstone, the ``erasures`` queue) is copied to
    each, then deleted. Idempotent: a second run finds nothing to move. Returns what was moved.

    Raises
    ------
    StartError
        When the Redis was run with another partition count than ``partitions`` (its ``partitions`` key).
    """
    stored = r.get(keys.PARTITIONS)
    if stored is not None and int(stored) != partitions:
        raise StartError(f"this Redis was written with PRIVADS_PARTITIONS={int(stored)}, not {partitions}: "
                         "migrate with the count it was run with")
    moved = copied = 0
    for raw in r.scan_iter(count=1000):
        key = cast(bytes, raw).decode()
        names = new_name(key, partitions)
        if not names:
            continue
        if len(names) == 1:
            r.rename(key, names[0])
            moved += 1
            continue
        dump, ttl = cast(bytes, r.dump(key)), int(r.pttl(key))  # a pttl of -1: no expiry, restored as 0
        pipe = r.pipeline(transaction=True)
        for name in names:
            pipe.restore(name, max(ttl, 0), dump, replace=True)
        pipe.delete(key)
        pipe.execute()
        copied += 1
    r.set(LAYOUT, VERSION)
    return {"renamed": moved, "copied_to_every_partition": copied}
