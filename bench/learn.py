"""``privads bench learn``: the production index, the encoder, and the ranker on simulated traffic."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from privads.bench.synthetic import learned_users, logged_traffic, make_world
from privads.infra import progress
from privads.infra.settings import Settings
from privads.learner import ranking
from privads.learner.evaluation import auc, log_loss
from privads.ranker.encoder import AdEncoder
from privads.ranker.features import Rows, candidate_rows
from privads.ranker.index import build_index, fit_width, probe_queries
from privads.ranker.model import RankerModel
from privads.ranker.scoring import retrieval_keys
from privads.ranker.updates import UpdateParams, sigmoid


def synthetic_ads(n: int, d: int, topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (ads around topic centres) and log-normal bids, shapes (n, d) and (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, topics, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.exp(rng.normal(0.0, 0.6, n)).astype(np.float32)


def bench_index(ads: int, d: int, seed: int) -> dict:
    """Build the production index over ``ads`` synthetic ads; recall@500 is against exact search."""
    vectors, bids = synthetic_ads(ads, d, topics=max(10, ads // 500), seed=seed)
    keys = retrieval_keys(vectors, bids)
    index, info = build_index(keys, np.arange(ads, dtype=np.int64), k=500, seed=seed)
    queries = fit_width(probe_queries(keys, 300, np.random.default_rng(seed + 1)), index.d)  # the index's padding
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None, :], 500)
        times.append((time.perf_counter() - start) * 1000)
    return {"ads": ads, "index_type": info.type, "index_build_s": round(info.build_s, 2),
            "recall_at_500": round(info.recall_at_k, 4), "nlist": info.nlist, "nprobe": info.nprobe,
            "search_p50_ms_500": round(float(np.percentile(times, 50)), 3),
            "search_p99_ms_500": round(float(np.percentile(times, 99)), 3)}


def _p99_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


DCN_SIZES = ((32, (128, 64)), (16, (64, 32)), (8, (32, 16)), (4, (32,)))  # (cross rank, MLP widths)


def bench_ranker(params: UpdateParams, prior_precision: float, *, users: int = 20_000, ads: int = 5_000,
                 requests: int = 60_000, d: int = 64, epochs: int = 3, seed: int = 0,
                 kinds: tuple[str, ...] = ranking.KINDS) -> dict:
    """Train every ranker design on simulated traffic; AUC on the newest 20% and latency on 500 candidates.

    The served design (``dcn``) and the baseline (``logistic``) are timed in their
    numpy serving form, features included; the others (never served) as torch modules.
    """
    world = make_world(users, ads, d=d, seed=seed)
    u, counts = learned_users(world, 30, params, prior_precision, seed=seed + 1)
    data = logged_traffic(world, u, counts, requests, seed=seed + 2)
    cut = int(len(data) * 0.8)
    train, hold = data.take(slice(0, cut)), data.take(slice(cut, None))
    rng = np.random.default_rng(seed + 3)
    cand = rng.choice(ads, 500, replace=False)
    ctx = hold.rows.context[0]
    cats = hold.rows.category[:500]
    compared: dict[str, dict] = {"stream-dot": {"auc": round(auc(hold.clicked, hold.rows.dot), 4)}}
    for kind in kinds:
        fitted = ranking.fit(train, kind, epochs=epochs, seed=seed)
        z = ranking.predict_logits(fitted, hold.rows)
        row: dict[str, object] = {
            "auc": round(auc(hold.clicked, z), 4), "log_loss": round(log_loss(hold.clicked, sigmoid(z)), 5),
            "train_examples_per_s": round(fitted.examples_per_s)}
        if kind in ("dcn", "logistic"):
            model = ranking.export(fitted)

            # defs rather than lambdas with a default (the loop's model): mypy cannot type those as Callable[[], ...]
            def serve(m: RankerModel = model) -> np.ndarray:
                return m.request_logits(u[0], int(counts[0]), world.ads[cand], world.bids[cand], cats, ctx)

            row["p50_ms_500"], row["p99_ms_500"] = _p99_ms(serve, 2000)
            row["served_form"] = "numpy"
        else:
            rows = candidate_rows(u[0], int(counts[0]), world.ads[cand], world.bids[cand], cats, ctx)

            def run(f: ranking.Fitted = fitted, r: Rows = rows) -> None:
                ranking.predict_logits(f, r)

            row["p50_ms_500"], row["p99_ms_500"] = _p99_ms(run, 300)
            row["served_form"] = "torch"
        compared[kind] = row
    sizes: dict[str, dict] = {}
    for rank, hidden in DCN_SIZES:  # the served DCN's size was chosen on this trade-off
        model = ranking.export(ranking.fit(train, "dcn", epochs=epochs, seed=seed, dcn_size=(rank, hidden)))
        row = {"auc": round(auc(hold.clicked, model.click_logits(hold.rows)), 4),
               "served": (rank, hidden) == (ranking.DCN_RANK, ranking.DCN_HIDDEN)}

        def serve_size(m: RankerModel = model) -> np.ndarray:
            return m.request_logits(u[0], int(counts[0]), world.ads[cand], world.bids[cand], cats, ctx)

        row["p50_ms_500"], row["p99_ms_500"] = _p99_ms(serve_size, 2000)
        sizes[f"rank{rank}-mlp{'x'.join(map(str, hidden))}"] = row
    best = compared["dcn"]
    return {"ranker": "dcn", "ranker_auc": best["auc"], "baseline_auc": compared["logistic"]["auc"],
            "ranker_p99_ms_500": best["p99_ms_500"], "train_examples_per_s": best["train_examples_per_s"],
            "ranker_train_rows": len(train), "ranker_holdout_rows": len(hold), "ranker_comparison": compared,
            "dcn_sizes": sizes}


def bench_learn(settings: Settings, catalog: Path, backend: str, ads: int, repeat: int = 3) -> dict:
    """Encode the catalog's real ad texts ``repeat`` times (after a warm-up); report ads/s."""
    texts = [json.loads(line)["text"] for line in catalog.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="privads-bench-learn-") as tmp:
        enc = AdEncoder(backend, Path(tmp) / "encoder")
        progress.stage(f"bench learn: encoding {len(texts)} ad texts {repeat} times ({backend})")
        enc.encode(texts[:32])  # load (and, for onnx-int8, build the export) outside the timing
        start = time.perf_counter()
        for _ in range(repeat):
            enc.encode(texts)
        seconds = time.perf_counter() - start
    d, seed = settings.d_user, settings.seed
    progress.stage(f"bench learn: the index over {ads} ads, then the ranker")
    return {**bench_index(ads, d, seed), "encode_backend": backend, "encode_texts": len(texts) * repeat,
            "encode_ads_per_s": round(len(texts) * repeat / seconds),
            **bench_ranker(UpdateParams.from_settings(settings), settings.prior_precision, d=d, seed=seed)}
