"""``privads bench serve``: the real HTTP app over a 1M-ad production index, loaded from another process.

What runs: a tansu broker and a redis-server of its own; a model version with
``ads`` synthetic ads (clustered unit vectors, log-normal bids, 1,000
categories) in the production index (IVF-SQfp16, nprobe tuned to recall@500 ≥
0.95 on a sample of the users it then serves, as the learner tunes it on the
archive's) and a DCN ranker trained on simulated traffic; warm users written to
Redis as the workers would. Then ``privads api`` (uvicorn, ``api_workers``
processes) is started and loaded by ``bench.loadgen_http`` in a separate
process: closed loop, ``concurrency`` requests in flight rotating over 128
keep-alive connections (so that they spread over the API processes as many
clients' would; the kernel hashes each connection to one process), 80% warm
users and 20% never-seen ones, every request a full ``POST /recommend`` (k = 10)
that logs its impressions to the broker. The arms are the defaults: 10% of users
in the popularity control. Every Monte-Carlo draw samples a Gamma calibration
factor for each shortlisted candidate (as every request does).

The floor is the same framework (uvicorn + FastAPI + the same middleware)
answering a constant ``/recommend``-sized body, under the same load.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from fastapi import FastAPI
from pydantic import BaseModel

from privads.bench.learn import synthetic_ads
from privads.bench.scratch import scratch_dir
from privads.bench.synthetic import learned_users, logged_traffic, make_world
from privads.infra import keys, progress
from privads.infra.kafka import create_topics
from privads.infra.processes import Process, free_port, python_process, start_private_infra
from privads.infra.settings import Settings
from privads.learner import ranking
from privads.ranker.artifacts import write_version
from privads.ranker.index import ServingCatalog
from privads.ranker.model import RankerModel
from privads.ranker.projector import initial_projector
from privads.ranker.updates import UpdateParams

CATEGORIES = 1000
CONNECTIONS = 128  # keep-alive connections of the load generator: many clients', spread over the API processes


def _ranker(params: UpdateParams, prior_precision: float, d: int,
            seed: int) -> tuple[RankerModel, np.ndarray, np.ndarray]:
    """A DCN trained on simulated traffic, and the simulated users' vectors and counts."""
    world = make_world(20_000, 5_000, d=d, seed=seed)
    users, counts = learned_users(world, 30, params, prior_precision, seed=seed + 1)
    data = logged_traffic(world, users, counts, 20_000, seed=seed + 2)
    model = ranking.export(ranking.fit(data, "dcn", epochs=1, seed=seed))
    return model, users, counts


def build_model(ads: int, settings: Settings) -> tuple[dict, np.ndarray, np.ndarray]:
    """Write a model version (index + ranker) over ``ads`` synthetic ads; returns manifest, users, counts."""
    d, seed = settings.d_user, settings.seed
    vectors, bids = synthetic_ads(ads, d, topics=max(10, ads // 500), seed=seed)
    rng = np.random.default_rng(seed)
    categories = [f"cat-{c}" for c in rng.integers(0, CATEGORIES, ads)]
    ad_ids = [f"ad-{i:07d}" for i in range(ads)]
    ranker, users, counts = _ranker(UpdateParams.from_settings(settings), settings.prior_precision, d, seed)
    start = time.perf_counter()
    # nprobe is tuned on the users the bench serves (as the learner tunes it on the archive's), the prior included
    catalog = ServingCatalog.build(d, ad_ids, vectors, bids, np.ones(ads, bool), categories,
                                   exact_below=settings.exact_index_below, seed=seed,
                                   users=np.vstack([users, np.zeros((1, d), np.float32)]))
    build_s = time.perf_counter() - start
    projector = initial_projector(settings.d_ad, d, seed)
    manifest = write_version(settings.models_dir, projector, catalog,
                             {"parent": None, "catalog_change": "0-0", "reason": "bench serve",
                              "bench_index_build_s": round(build_s, 2)}, ranker)
    return manifest, users, counts


TASTES = 32  # categories in each warm user's tastes (``keys.pack_user``; the workers keep at most 64)


def seed_users(r: redis.Redis, users: np.ndarray, counts: np.ndarray, prior_precision: float,
               partitions: int, seed: int = 0) -> list[str]:
    """Write warm user posteriors and tastes the way the workers do; returns their ids."""
    ids = [f"bench-user-{i}" for i in range(users.shape[0])]
    rng = np.random.default_rng([seed, 5])
    pipe = r.pipeline(transaction=False)
    for i, uid in enumerate(ids):
        precision = np.full(users.shape[1], prior_precision + counts[i], dtype=np.float32)
        # tastes on 32 of the catalog's categories, as a user shown them and clicking some would have
        hashes = np.array([keys.category_hash(f"cat-{c}") for c in rng.choice(CATEGORIES, TASTES, replace=False)],
                          np.uint32)
        shown = rng.integers(1, 40, TASTES).astype(np.float64)
        tastes = keys.merge_tastes(keys.no_tastes(), hashes, rng.binomial(shown.astype(np.int64), 0.05),
                                   0.05 * shown, shown)
        pipe.set(keys.user(uid, partitions), keys.pack_user(users[i].astype(np.float32), precision, int(counts[i]),
                                                            tastes))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return ids


def request_pool(warm: list[str], n: int, seed: int) -> list[tuple[str, str, object]]:
    """``n`` /recommend bodies: 80% warm users, 20% never seen; device and daypart context."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str, object]] = []
    for i in range(n):
        user = warm[int(rng.integers(len(warm)))] if rng.random() < 0.8 else f"bench-new-{seed}-{i}"
        out.append(("POST", "/recommend", {"user_id": user, "k": 10, "context": {
            "device": ["mobile", "desktop", "tablet"][int(rng.integers(3))], "daypart": int(rng.integers(4))}}))
    return out


# --- the framework floor ---------------------------------------------------------------


class _FloorRequest(BaseModel):
    user_id: str
    k: int = 10
    context: dict = {}


_FLOOR_ANSWER = {"request_id": "0" * 32, "policy": "treatment", "model_version": "v0",
                 "ads": [{"ad_id": f"ad-{i:07d}", "position": i, "score": 0.1, "propensity": 0.5,
                          "impression_id": "0" * 32} for i in range(10)]}


def floor_app(settings: Settings | None = None) -> FastAPI:
    """A constant ``POST /recommend`` on the same framework stack: what serving costs with no work."""
    from privads.api.metrics import ApiMetrics
    from privads.api.middleware import ObserveAndLimit

    app = FastAPI()

    @app.post("/recommend")
    async def recommend(body: _FloorRequest) -> dict:
        return _FLOOR_ANSWER

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    app.add_middleware(ObserveAndLimit, metrics=ApiMetrics(), timeout_s=2.0)
    return app


# --- the run ----------------------------------------------------------------------------


def _load(port: int, pool_file: Path, concurrency: int, duration_s: float, warmup_s: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "privads.bench.loadgen_http", "--host", "127.0.0.1", "--port", str(port), "--requests",
         str(pool_file), "--concurrency", str(concurrency), "--duration", str(duration_s), "--warmup",
         str(warmup_s), "--connections", str(max(CONNECTIONS, concurrency))],
        capture_output=True, text=True, timeout=duration_s + warmup_s + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def bench_serve(settings: Settings, ads: int, concurrency: int, duration_s: float, warmup_s: float,
                api_workers: int) -> dict:
    """Run the serving benchmark; returns its figures."""
    with scratch_dir("privads-bench-serve-") as tmp:
        procs: list[Process] = []
        try:
            kafka, redis_url = start_private_infra(tmp, procs)
            port, floor_port = free_port(), free_port()
            # the bench's own API, on loopback over its own broker and Redis: no key (the load generator sends none)
            s = settings.model_copy(update={
                "kafka": kafka, "redis": redis_url, "data": tmp, "catalog": None,
                "api": f"http://127.0.0.1:{port}", "api_workers": api_workers, "api_key": None})
            create_topics(s.kafka_servers, s.partitions)
            r = redis.Redis.from_url(s.redis_url)
            progress.stage(f"bench serve: building a model version over {ads} ads")
            manifest, users, counts = build_model(ads, s)
            r.set(keys.MODEL_CURRENT, json.dumps(manifest))
            warm = seed_users(r, users, counts, s.prior_precision, s.partitions, s.seed)
            pool = tmp / "requests.jsonl"
            from privads.bench.loadgen_http import write_requests

            write_requests(pool, request_pool(warm, 20_000, s.seed))

            def serving() -> bool:
                h = httpx.get(f"{s.api}/healthz", timeout=2).json()
                return h.get("model_version") == manifest["version"]

            api = python_process("api", ["api"], tmp / "api.log", s.child_env(), ready=serving)
            progress.stage(f"bench serve: starting {api_workers} API processes")
            api.start(timeout=300)
            procs.append(api)
            progress.stage(f"bench serve: /recommend, {concurrency} in flight, {warmup_s:.0f} s warm-up and "
                           f"{duration_s:.0f} s measured")
            loaded = _load(port, pool, concurrency, duration_s, warmup_s)
            metrics = httpx.get(f"{s.api}/metrics", timeout=10).text
            api.stop(30)
            procs.remove(api)

            floor = Process("floor", [sys.executable, "-m", "privads.bench.serve", str(floor_port)],
                            tmp / "floor.log", env=s.child_env(),
                            ready=lambda: httpx.get(f"http://127.0.0.1:{floor_port}/healthz",
                                                    timeout=1).status_code == 200)
            floor.start(timeout=60)
            procs.append(floor)
            progress.stage("bench serve: the empty endpoint's floor, the same load")
            floor_load = _load(floor_port, pool, concurrency, duration_s, warmup_s)
            return {
                "ads": manifest["index"]["ads"], "index_type": manifest["index"]["type"],
                "nlist": manifest["index"]["nlist"], "nprobe": manifest["index"]["nprobe"],
                "recall_at_500": manifest["index"].get("recall_at_500"), "ranker": manifest["ranker"]["type"],
                "candidates": s.candidates, "draws": s.propensity_draws, "k": 10,
                "p50_ms": loaded["p50_ms"], "p90_ms": loaded["p90_ms"], "p99_ms": loaded["p99_ms"],
                "max_ms": loaded["max_ms"], "qps": loaded["qps"], "requests": loaded["requests"],
                "errors": loaded["errors"], "floor_p50_ms": floor_load["p50_ms"], "floor_p99_ms": floor_load["p99_ms"],
                "floor_qps": floor_load["qps"], "concurrency": concurrency, "connections": loaded.get("connections"),
                "api_workers": api_workers, "control_share": s.control_share, "control_policy": s.control_policy,
                "tuned_on": manifest["index"].get("tuned_on"),
                "duration_s": duration_s, "client_cpu_ms_per_request": loaded.get("client_cpu_ms_per_request"),
                "impressions_queued_at_end": _metric(metrics, "privads_impression_queue_depth"),
                "impressions_dropped": _metric(metrics, "privads_impressions_dropped_total"),
                "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            }
        finally:
            for p in reversed(procs):
                p.stop(20)


if __name__ == "__main__":  # the floor server: ``python -m api.bench PORT`` (settings from the environment)
    from privads.api.server import serve

    serve(Settings(), "127.0.0.1", int(sys.argv[1]), factory="privads.bench.serve:floor_app")
