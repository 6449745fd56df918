"""One learner cycle, and the periodic loop around it.

A cycle reads the catalog the stream has encoded, projects it with the
projector (warm-started from the served version), builds the index, writes a
new version and announces it. Training the projector and ranker on archived
labelled impressions, the evaluation gate and promotion are issue 4.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import numpy as np
import orjson

from infra.kafka import make_producer
from infra.settings import Settings
from infra.store import CatalogStore, ModelPointer, QualityBoard, connect
from learner.artifacts import collect_garbage, write_version
from learner.projector import Projector, initial_projector
from ranker.index import ServingCatalog
from streams.records import MODEL_UPDATES

log = logging.getLogger(__name__)
READ_CHUNK = 5000


async def run_cycle(settings: Settings, reason: str = "scheduled") -> dict:
    """Build and publish one model version; returns its manifest."""
    r = connect(settings.redis_url)
    try:
        catalog_store, pointer = CatalogStore(r), ModelPointer(r)
        current = await pointer.get()
        if current is None:
            projector = initial_projector(settings.d_ad, settings.d_user, settings.seed)
            parent = None
        else:
            projector = Projector.load(Path(current["path"]) / "projector.npz")
            parent = current["version"]
        # the change id first: anything changed after it is replayed by readers as a delta
        change = await catalog_store.last_change()
        ids = await catalog_store.all_ids()
        entries, vectors = [], []
        for i in range(0, len(ids), READ_CHUNK):
            chunk, emb = await catalog_store.read(ids[i:i + READ_CHUNK])
            entries += chunk
            vectors.append(projector.project(emb))
        d = projector.d_user
        serving = await asyncio.to_thread(
            ServingCatalog.build, d, [e.ad_id for e in entries],
            np.concatenate(vectors) if vectors else np.zeros((0, d), np.float32),
            np.array([e.bid for e in entries], dtype=np.float32), np.array([e.active for e in entries], dtype=bool),
            [e.category for e in entries], exact_below=settings.exact_index_below, seed=settings.seed)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        manifest = write_version(settings.models_dir, projector, serving, {
            "parent": parent, "catalog_change": change, "reason": reason,
            "changed": ["index"] if parent else ["projector", "index"],
        })
        await pointer.set(manifest)
        removed = collect_garbage(settings.models_dir, settings.keep_versions, manifest["version"])
    finally:
        await r.aclose()
    announce(settings, manifest)
    log.info("published %s (%d ads; removed %s)", manifest["version"], manifest["index"]["size"], removed)
    return manifest


def announce(settings: Settings, manifest: dict) -> None:
    """Produce the ``privads.model-updates`` event for a published version."""
    producer = make_producer(settings.kafka_servers)
    try:
        event = {"version": manifest["version"], "ts": manifest["built_at"], "path": manifest["path"],
                 "changed": manifest["changed"], "index": manifest["index"]}
        producer.send(MODEL_UPDATES, key=manifest["version"].encode(), value=orjson.dumps(event)).get(timeout=10)
    finally:
        producer.close(timeout=5)


def run_loop(settings: Settings) -> None:
    """Run a cycle now and then every ``learner_interval_s`` until SIGTERM/SIGINT."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    next_run, last_cycle, last_check = 0.0, 0.0, 0.0
    while not stop:
        reason = "scheduled" if time.monotonic() >= next_run else None
        if reason is None and time.monotonic() - last_check >= 1.0:
            last_check = time.monotonic()
            try:
                reason = "drift" if asyncio.run(drift_since(settings, last_cycle)) else None
            except Exception as e:  # noqa: BLE001 - a missed check only delays the next cycle
                log.warning("drift check failed: %s", e)
        if reason:
            last_cycle = time.time()
            try:
                asyncio.run(run_cycle(settings, reason=reason))
            except Exception:  # noqa: BLE001 - a failed cycle is logged; the served version stays
                log.exception("learner cycle failed; the served version is unchanged")
            next_run = time.monotonic() + settings.learner_interval_s
        time.sleep(0.2)


async def drift_since(settings: Settings, ts: float) -> bool:
    """Whether a worker flagged drift in the served model's predictions after ``ts``."""
    r = connect(settings.redis_url)
    try:
        return await QualityBoard(r).drift_since(ts)
    finally:
        await r.aclose()
