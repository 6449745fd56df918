"""``privads bench cycle``: one learner cycle's wall time and peak memory over an archive of a given size.

What runs: a tansu broker and a redis-server of its own (as ``bench serve``); a
synthetic catalog of ``ads`` ads in Redis (unit 384-d text embeddings clustered
by topic, log-normal bids) and ``users`` user states; then an archive of
``impressions`` impressions spread evenly over the last ``days`` days (up to
now), written through ``streams.archive.write_chunk`` as the workers' drain
writes it, in chunks, so that generating 10M holds one chunk at a time. Each
request shows 10 ads to one user; a click follows a hidden logistic model
``σ(u · p(ad) + logit(ctr))``, ``p`` a fixed random projection of the ad's
embedding (unit rows), ``u`` the user's vector, which every impression logs as
served (``user_mean``), so the cycle has something to learn.

Then ``privads train`` runs once as a child process (as the learner loop runs
``run_cycle``): its wall time, and its peak resident memory from ``wait4``'s
rusage, exact for that child whatever the generator itself held. The learner
reads only the training window's hours (``train_window_s``, a week, before the
newest settled impression), at most ``MAX_EXAMPLES`` rows: with the default 14
days, half of the archive is older than the window.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import redis

from privads.bench.scratch import scratch_dir
from privads.infra import keys, progress
from privads.infra.kafka import create_topics
from privads.infra.processes import Process, start_private_infra
from privads.infra.records import Ad, Labelled, pack_served
from privads.infra.settings import Settings
from privads.infra.store import CatalogStore, connect
from privads.ranker.updates import logit, sigmoid
from privads.streams import archive

SLOTS = 10  # impressions per request: one user, ten ads, positions 0-9
CHUNK = 50_000  # impressions per archive chunk (a multiple of SLOTS: a request never spans two chunks)
USER_CHUNK = 5000  # user states per Redis pipeline
AD_CHUNK = 1000  # ads per catalog transaction
TOPICS = 20
DEVICES = ("mobile", "desktop", "tablet")
CLICK_DELAY_S = 60.0  # a click lands up to this long after its impression
CYCLE_TIMEOUT_S = 3 * 3600.0


class World:
    """The synthetic catalog, users and hidden click model, all drawn from ``seed``.

    Parameters
    ----------
    ads, users : int
        Catalog and audience sizes.
    d_ad, d_user : int
        Text embedding and user dimensions (the settings').
    prior_precision : float
        The users' prior precision; a user's stored precision is it plus the user's count.
    seed : int
    """

    def __init__(self, ads: int, users: int, d_ad: int, d_user: int, prior_precision: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        # like real ad texts, the embeddings cluster by topic (the sample catalog's categories separate cleanly)
        topics = rng.standard_normal((TOPICS, d_ad)).astype(np.float32)
        self.topic = rng.integers(0, TOPICS, ads)
        emb = topics[self.topic] + 0.3 * rng.standard_normal((ads, d_ad)).astype(np.float32)
        self.embeddings = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        self.bids = np.exp(rng.normal(0.0, 0.6, ads)).astype(np.float32)
        # the hidden truth: a random projection of the text space (unit rows, as ranker.projector's), so that
        # u · p has the users' scale: std 1 in logit, a learnable signal
        truth = self.embeddings @ rng.standard_normal((d_ad, d_user)).astype(np.float32)
        self.projected = truth / np.linalg.norm(truth, axis=1, keepdims=True)
        self.users = rng.standard_normal((users, d_user)).astype(np.float32)
        self.counts = rng.integers(1, 50, users)
        self.prior_precision = prior_precision
        self.ad_ids = [f"ad-{i:06d}" for i in range(ads)]

    def catalog(self) -> tuple[list[Ad], list[str], dict[str, np.ndarray]]:
        """The ads, their text hashes and embeddings, as ``CatalogStore.upsert`` takes them."""
        ads = [Ad(ad_id=a, text=f"synthetic ad {i} of topic {self.topic[i]}", bid=float(self.bids[i]),
                  category=f"topic-{self.topic[i]}") for i, a in enumerate(self.ad_ids)]
        hashes = [f"bench-{i}" for i in range(len(ads))]
        return ads, hashes, dict(zip(hashes, self.embeddings, strict=True))

    def user_state(self, i: int) -> bytes:
        """User ``i``'s posterior as the workers store it (``keys.pack_user``)."""
        precision = np.full(self.users.shape[1], self.prior_precision + self.counts[i], np.float32)
        return keys.pack_user(self.users[i], precision, int(self.counts[i]))


def _store_catalog(url: str, world: World) -> None:
    async def store() -> None:
        r = connect(url)
        try:
            ads, hashes, emb = world.catalog()
            for i in range(0, len(ads), AD_CHUNK):
                part = hashes[i:i + AD_CHUNK]
                await CatalogStore(r).upsert(ads[i:i + AD_CHUNK], part, {h: emb[h] for h in part})
        finally:
            await r.aclose()

    asyncio.run(store())


def _store_users(r: redis.Redis, world: World, partitions: int) -> None:
    # the learner keeps only rows whose user still has a state (an erased user has none)
    pipe = r.pipeline(transaction=False)
    for i in range(world.users.shape[0]):
        pipe.set(keys.user(f"u{i}", partitions), world.user_state(i))
        if i % USER_CHUNK == USER_CHUNK - 1:
            pipe.execute()
    pipe.execute()


def request_times(impressions: int, days: float, now: float) -> np.ndarray:
    """Each request's ``ts``: evenly spread over the ``days`` days before ``now``, the last at ``now``.

    Returns
    -------
    ndarray, shape (ceil(impressions / SLOTS),), float64, increasing
    """
    n = -(-impressions // SLOTS)
    span = days * 86400.0
    return now - span + span * (np.arange(n, dtype=np.float64) + 1.0) / n


def archive_chunks(world: World, times: np.ndarray, impressions: int, ctr: float,
                   seed: int) -> Iterator[tuple[str, bytes, bytes, int]]:
    """The archive's chunks, oldest first: ``(first_id, impression lines, msgpack labels, clicks)``.

    ``first_id`` is ``{ms}_{k}``: the commit time (the chunk's newest ``ts``, in ms) that
    ``read_recent`` orders files by, and the chunk's number, which keeps names distinct.
    Each chunk is drawn from one generator, in order, so a seed gives one archive.
    """
    rng = np.random.default_rng(seed)
    packed = [pack_served(u) for u in world.users]  # the users as served: fixed in this world
    counts = world.counts.tolist()
    bias = logit(ctr)
    for k, lo in enumerate(range(0, impressions, CHUNK)):
        hi = min(lo + CHUNK, impressions)
        idx = np.arange(lo, hi)
        req = idx // SLOTS
        first_req = lo // SLOTS
        n_req = int(req[-1]) - first_req + 1
        ui = rng.integers(0, world.users.shape[0], n_req)[req - first_req]
        ai = rng.integers(0, len(world.ad_ids), hi - lo)
        clicked = rng.random(hi - lo) < sigmoid((world.users[ui] * world.projected[ai]).sum(1) + bias)
        propensity = rng.uniform(0.05, 1.0, hi - lo)
        device = rng.integers(0, len(DEVICES), n_req)[req - first_req]
        delay = rng.uniform(1.0, CLICK_DELAY_S, hi - lo)
        ts = times[req]
        lines = [
            f'{{"event_id":"i{i}","ts":{t!r},"user_id":"u{u}","ad_id":"{world.ad_ids[a]}","position":{i % SLOTS},'
            f'"propensity":{q:.4f},"policy":"treatment","model_version":null,"request_id":"r{i // SLOTS}",'
            f'"context":{{"device":"{DEVICES[dv]}"}},"user_mean":"{packed[u]}","user_count":{counts[u]}}}'.encode()
            for i, t, u, a, q, dv in zip(idx.tolist(), ts.tolist(), ui.tolist(), ai.tolist(), propensity.tolist(),
                                         device.tolist(), strict=True)]
        hits = np.flatnonzero(clicked)
        labels = [Labelled(impression_id=f"i{lo + j}", user_id=f"u{ui[j]}", ad_id=world.ad_ids[ai[j]],
                           ts=float(ts[j] + delay[j]), clicked=True, policy="treatment") for j in hits.tolist()]
        yield f"{int(ts[-1] * 1000)}_{k}", b"\n".join(lines), msgspec.msgpack.encode(labels), int(hits.size)


def _dir_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def run_train(settings: Settings, log: Path) -> tuple[dict, float, float]:
    """Run ``privads train`` once as a child; returns its output, wall seconds and peak RSS (MiB).

    The peak is the child's own ``ru_maxrss`` from ``wait4`` (KiB on Linux): exact for
    that process, whatever this one holds.
    """
    env = {**os.environ, **settings.child_env()}
    with open(log, "wb") as err, open(log.with_suffix(".out"), "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "privads", "train"], env=env, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        finally:
            if proc.returncode is None:  # interrupted (SIGTERM, Ctrl-C): the child must not outlive the bench
                proc.kill()
                proc.wait(10)
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"the learner cycle exited {proc.returncode}: {tail[0] if tail else 'no output'}")
    return json.loads(log.with_suffix(".out").read_text()), elapsed, usage.ru_maxrss / 1024


def _evaluation(manifest: dict) -> dict:
    """What the manifest's evaluation says the cycle trained on, and how it scored."""
    ev = manifest.get("evaluation") or {}
    proj, rank = ev.get("projector") or {}, ev.get("ranker") or {}
    out: dict = {"examples": proj.get("examples"), "holdout": proj.get("holdout", rank.get("holdout")),
                 "projector_trained": proj.get("trained"), "projector_promoted": proj.get("promoted"),
                 "ranker_trained": rank.get("trained"), "ranker_kind": rank.get("kind"),
                 "ranker_promoted": rank.get("promoted"),
                 "ranker_holdout_auc": (rank.get("candidate") or {}).get("auc"),
                 "ranker_train_examples_per_s": rank.get("train_examples_per_s"),
                 "click_recall_at_500": ev.get("click_recall_at_500")}
    if not proj.get("trained"):
        out["not_trained_because"] = proj.get("reason")
    return out


def validate(impressions: int, days: float, ads: int, users: int, ctr: float) -> None:
    """Raise ``ValueError`` (one line) on arguments the bench cannot run with."""
    if impressions < 1:
        raise ValueError(f"--impressions must be ≥ 1, got {impressions}")
    if not days > 0:
        raise ValueError(f"--days must be > 0, got {days}")
    if ads < 2:  # the learner's catalog-fitted projector needs 2 ads
        raise ValueError(f"--ads must be ≥ 2, got {ads}")
    if users < 1:
        raise ValueError(f"--users must be ≥ 1, got {users}")
    if not 0 < ctr < 1:
        raise ValueError(f"ctr must be in (0, 1), got {ctr}")


def bench_cycle(settings: Settings, impressions: int, *, days: float = 14.0, ads: int = 2000, users: int = 100_000,
                ctr: float = 0.05, seed: int = 0) -> dict:
    """Generate an archive of ``impressions`` over ``days`` days, then time one learner cycle over it.

    Parameters
    ----------
    settings : Settings
        The learner's settings (its window, epochs, dimensions); the broker, Redis and
        data directory are replaced by private ones in a temporary directory.
    impressions : int
        Archived impressions, spread evenly over the last ``days`` days.
    days : float
    ads, users : int
        Catalog size and audience size (every user has a state in Redis).
    ctr : float
        The hidden click model's base rate (the realised CTR is somewhat higher: the users' signal adds to it).
    seed : int
        Seeds the catalog, the users, the archive and the learner.

    Returns
    -------
    dict
        The sizes, ``archive_bytes``, ``generate_s``, ``cycle_s``,
        ``cycle_peak_rss_mib`` and what the cycle's manifest says it trained on.
    """
    validate(impressions, days, ads, users, ctr)
    with scratch_dir("privads-bench-cycle-") as tmp:
        procs: list[Process] = []
        try:
            kafka, redis_url = start_private_infra(tmp, procs)
            s = settings.model_copy(update={"kafka": kafka, "redis": redis_url, "data": tmp, "catalog": None,
                                            "seed": seed})
            create_topics(s.kafka_servers, s.partitions)
            start = time.perf_counter()
            world = World(ads, users, s.d_ad, s.d_user, s.prior_precision, seed)
            _store_catalog(s.redis_url, world)
            r = redis.Redis.from_url(s.redis_url)
            try:
                _store_users(r, world, s.partitions)
            finally:
                r.close()
            times = request_times(impressions, days, time.time())
            root = s.local / "archive"  # a directory: the bench writes its own archive there
            clicks = 0
            with progress.bar("bench cycle: writing the archive", total=impressions, unit="imp") as bar:
                for first_id, lines, labels, hits in archive_chunks(world, times, impressions, ctr, seed + 1):
                    entry = first_id.replace("_", "-").encode()
                    archive.write_chunk(root, 0, first_id, [(entry, {b"imp": lines, b"lab": labels})])
                    clicks += hits
                    bar.update(lines.count(b"\n") + 1)
            generate_s = time.perf_counter() - start
            # the rows the learner's window holds (learner.cycle.load_examples): newest settled minus train_window_s
            until = float(times[-1]) - s.attribution_window_s
            req_in = (times >= until - s.train_window_s) & (times <= until)
            slots = np.minimum(SLOTS, impressions - SLOTS * np.arange(times.size))  # the last request may be short
            window = int(slots[req_in].sum())
            archive_bytes = _dir_bytes(root)

            progress.stage("bench cycle: one learner cycle (privads train, a child process)")
            out, cycle_s, peak_mib = run_train(s, tmp / "train.log")
            manifest = json.loads((Path(out["path"]) / "manifest.json").read_text())
            return {
                "impressions": impressions, "days": days, "ads": ads, "users": users, "clicks": clicks,
                "archive_bytes": archive_bytes, "archive_gib": round(archive_bytes / 2**30, 3),
                "generate_s": round(generate_s, 1),
                "generate_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "train_window_s": s.train_window_s, "window_impressions": window,
                "cycle_s": round(cycle_s, 1), "cycle_peak_rss_mib": round(peak_mib, 1),
                **_evaluation(manifest), "version": manifest["version"],
                "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            }
        finally:
            for p in reversed(procs):
                p.stop(20)
            shutil.rmtree(tmp, ignore_errors=True)
