"""One learner cycle, and the periodic loop around it.

A cycle reads the catalog the stream has encoded and the archived labelled
impressions; trains a candidate projector (users frozen, warm-started from the
served one) on all but the newest 20% of them by time; scores candidate and
served projector on that holdout and keeps the candidate only if the gate
passes; projects the catalog with the winner, builds the index, writes a new
version and announces it. The learned ranker is still to come (issue 4).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson

from infra.kafka import make_producer
from infra.settings import Settings
from infra.store import CatalogStore, ModelPointer, QualityBoard, UserStore, connect
from learner.artifacts import collect_garbage, write_version
from learner.evaluation import Scores, auc, gate, log_loss
from learner.projector import Projector, initial_projector
from learner.train import train_projector
from ranker.index import ServingCatalog
from streams import archive
from streams.records import MODEL_UPDATES
from streams.updates import logit, sigmoid

log = logging.getLogger(__name__)
READ_CHUNK = 5000


HOLDOUT = 0.2
MIN_EXAMPLES = 200
MAX_EXAMPLES = 1_000_000


@dataclass
class Examples:
    """Labelled impressions for training, in time order."""

    ads: np.ndarray  # (n, d_ad) text embeddings
    users: np.ndarray  # (n, d_user) frozen user vectors
    clicked: np.ndarray  # (n,)
    ts: np.ndarray  # (n,)


async def load_examples(settings: Settings, r: object, embeddings: dict[str, np.ndarray]) -> Examples | None:
    """Archived impressions whose attribution window has closed, labelled by the archived clicks.

    Rows whose user has no learned state (erased, or never labelled) or whose ad
    has no embedding are left out. The newest ``MAX_EXAMPLES`` are kept.
    """
    root = settings.data / "archive"
    imps = await asyncio.to_thread(archive.read_table, root, "impressions")
    if imps.num_rows == 0:
        return None
    labels = await asyncio.to_thread(archive.read_table, root, "labels")
    ts = imps.column("ts").to_numpy()
    final = ts <= ts.max() - settings.attribution_window_s  # labels of newer ones may still change
    order = np.argsort(ts[final], kind="stable")[-MAX_EXAMPLES:]
    rows = np.flatnonzero(final)[order]
    event_ids = np.asarray(imps.column("event_id").to_pylist(), dtype=object)[rows]
    user_ids = np.asarray(imps.column("user_id").to_pylist(), dtype=object)[rows]
    ad_ids = np.asarray(imps.column("ad_id").to_pylist(), dtype=object)[rows]
    clicked_ids = set(labels.column("impression_id").to_pylist())
    distinct = list(dict.fromkeys(user_ids.tolist()))
    states = await UserStore(r).get_many(distinct)  # type: ignore[arg-type]
    user_vec = {u: s[0] for u, s in zip(distinct, states) if s is not None and s[0].shape[0] == settings.d_user}
    keep = np.array([u in user_vec and a in embeddings for u, a in zip(user_ids, ad_ids)], dtype=bool)
    if not keep.any():
        return None
    return Examples(
        ads=np.stack([embeddings[a] for a in ad_ids[keep]]),
        users=np.stack([user_vec[u] for u in user_ids[keep]]),
        clicked=np.array([e in clicked_ids for e in event_ids[keep]], dtype=np.float32),
        ts=ts[rows][keep],
    )


def holdout_scores(projector: Projector, ex: Examples, bias: float) -> Scores:
    """How well ``σ(u · p(ad) + b)`` under ``projector`` predicts the held-out clicks."""
    p = sigmoid((ex.users * projector.project(ex.ads)).sum(1) + bias)
    return Scores(auc=auc(ex.clicked, p), log_loss=log_loss(ex.clicked, p))


def choose_projector(served: Projector, ex: Examples | None, settings: Settings,
                     trainer: Callable[..., Projector]) -> tuple[Projector, dict]:
    """Train a candidate on the older examples; keep it only if it is not worse on the newest."""
    if ex is None or len(ex.clicked) < MIN_EXAMPLES:
        return served, {"trained": False, "reason": f"fewer than {MIN_EXAMPLES} labelled impressions"}
    cut = int(len(ex.clicked) * (1 - HOLDOUT))
    train = Examples(ex.ads[:cut], ex.users[:cut], ex.clicked[:cut], ex.ts[:cut])
    hold = Examples(ex.ads[cut:], ex.users[cut:], ex.clicked[cut:], ex.ts[cut:])
    if train.clicked.min() == train.clicked.max():
        return served, {"trained": False, "reason": "training examples have a single class"}
    bias = logit(settings.base_rate)
    candidate = trainer(train.ads, train.users, train.clicked, served, bias=bias, seed=settings.seed)
    cand, base = holdout_scores(candidate, hold, bias), holdout_scores(served, hold, bias)
    verdict = gate(cand, base)
    info = {"trained": True, "examples": len(ex.clicked), "holdout": len(hold.clicked),
            "candidate": asdict(cand), "served": asdict(base), "promoted": verdict.promote, "reason": verdict.reason}
    if not verdict.promote:
        log.warning("candidate projector rejected: %s", verdict.reason)
        return served, info
    return candidate, info


async def run_cycle(settings: Settings, reason: str = "scheduled",
                    trainer: Callable[..., Projector] = train_projector) -> dict:
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
        entries, embs = [], []
        for i in range(0, len(ids), READ_CHUNK):
            chunk, emb = await catalog_store.read(ids[i:i + READ_CHUNK])
            entries += chunk
            embs.append(emb)
        emb_all = np.concatenate(embs) if embs else np.zeros((0, settings.d_ad), np.float32)
        examples = await load_examples(settings, r, {e.ad_id: v for e, v in zip(entries, emb_all)})
        served = projector
        projector, evaluation = await asyncio.to_thread(choose_projector, served, examples, settings, trainer)
        serving = await asyncio.to_thread(
            ServingCatalog.build, projector.d_user, [e.ad_id for e in entries], projector.project(emb_all),
            np.array([e.bid for e in entries], dtype=np.float32), np.array([e.active for e in entries], dtype=bool),
            [e.category for e in entries], exact_below=settings.exact_index_below, seed=settings.seed)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        manifest = write_version(settings.models_dir, projector, serving, {
            "parent": parent, "catalog_change": change, "reason": reason, "evaluation": evaluation,
            "changed": ["index"] if (parent and projector is served) else ["projector", "index"],
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
