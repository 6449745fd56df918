"""Erasure beyond the stream's state: the archive's compaction, and what export and replay leave out.

``DELETE /users/{id}`` (``infra.store.UserStore.erase``) deletes the user's state
and pending events at once, and leaves two things behind in Redis: a tombstone
``erased:{hash}`` kept for good (every event of the user from before it is
ignored, however late it comes: a backlog, a backfilled export) and an entry in
``erasures`` (hash → when). From the tombstone on:

- a worker's batch committed after the erasure archives none of the user's rows, and the
  archive's drain (``streams.archive.drain``) leaves them out of the batches committed
  before it, while the erasure is pending;
- ``export-logs``, ``replay`` and the learner's examples leave out every row of an
  erased user from before the erasure (``without_erased``), so no copy made or read
  afterwards holds them, even before the files are compacted;
- the next compaction pass here rewrites the archive files that still hold such rows
  without them (``streams.archive.compact``), and forgets the entry in ``erasures`` once
  no batch committed before the erasure waits in Redis to be archived.

The rows are therefore physically gone from the archive within
``erasure_compaction_s`` + one pass of the erasure (the workers drain their batches
every few seconds; a pass that finds one from before the erasure still waiting keeps
the erasure pending and removes the rows at the next pass).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privads.infra.objects import archive_of
from privads.infra.records import erased_event
from privads.infra.settings import Settings
from privads.infra.store import Client, UserStore, connect
from privads.streams import archive

log = logging.getLogger("privads.learner.erasure")



def without_erased(user_ids: Sequence[str], ts: Sequence[float] | np.ndarray,
                   erased: Mapping[str, float]) -> np.ndarray:
    """Which rows to keep: not those of an erased user from before the erasure.

    Parameters
    ----------
    user_ids : sequence of str, length n
    ts : array-like of float, shape (n,)
        Each row's event time.
    erased : mapping
        User id → when erased (``UserStore.erased_since``).

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    return np.array([not erased_event(erased, u, t) for u, t in zip(user_ids, ts, strict=True)], dtype=bool)


async def compact_archive(settings: Settings, r: Client, now: float | None = None) -> dict[str, Any]:
    """One compaction pass: the hours past the archive's retention removed, then the erased users' rows out of
    the files left; settles the erasures it covered."""
    users = UserStore(r, settings.partitions)
    started = time.time() if now is None else now
    # never less than the training window: the learner must find the hours it trains on
    keep_s = max(settings.archive_retention_s, settings.train_window_s + settings.attribution_window_s)
    hours = await asyncio.to_thread(archive.prune, archive_of(settings), started - keep_s)
    if hours:
        log.info("archive retention: removed %d hour directories older than %.0f s", hours, keep_s)
    pending = await users.pending_erasures()
    if not pending:
        return {"pending": 0, "files": 0, "rows": 0, "settled": 0, "hours_pruned": hours}
    # read before the files: an erasure is settled once no batch committed before it waits in Redis any more, so
    # every file that can hold its rows was written (the drain trims a chunk only after writing it) before this pass
    # lists them; a batch committed after it holds none of the user's rows (streams.worker)
    oldest = await users.oldest_unarchived()
    ready = {h: t for h, t in pending.items() if oldest is None or oldest > t}
    files, rows = await asyncio.to_thread(archive.compact, archive_of(settings), pending)
    settled = await users.settle_erasures(ready)
    out = {"pending": len(pending), "files": files, "rows": rows, "settled": settled, "hours_pruned": hours}
    if files or settled:
        log.info("erasure compaction: %s", out)
    return out


async def erased_of(settings: Settings, user_ids: Sequence[str]) -> dict[str, float]:
    """The erased ones of ``user_ids``, with when, from the stack's Redis (``settings.redis_url``)."""
    r = connect(settings.redis_url)
    try:
        return await UserStore(r, settings.partitions).erased_since(user_ids)
    finally:
        await r.aclose()
