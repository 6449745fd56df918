"""``privads bench learn``: the encoder and the production index (training and ranker figures: issue 4)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from learner.encoder import AdEncoder
from ranker.index import build_index, probe_queries
from ranker.scoring import retrieval_keys


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
    queries = probe_queries(keys, 300, np.random.default_rng(seed + 1))
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None, :], 500)
        times.append((time.perf_counter() - start) * 1000)
    return {"ads": ads, "index_type": info.type, "index_build_s": round(info.build_s, 2),
            "recall_at_500": round(info.recall_at_k, 4), "nlist": info.nlist, "nprobe": info.nprobe,
            "search_p50_ms_500": round(float(np.percentile(times, 50)), 3),
            "search_p99_ms_500": round(float(np.percentile(times, 99)), 3)}


def bench_learn(catalog: Path, backend: str, ads: int, d: int, seed: int, repeat: int = 3) -> dict:
    """Encode the catalog's real ad texts ``repeat`` times (after a warm-up); report ads/s."""
    texts = [json.loads(line)["text"] for line in catalog.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="privads-bench-learn-") as tmp:
        enc = AdEncoder(backend, Path(tmp) / "encoder")
        enc.encode(texts[:32])  # load (and, for onnx-int8, build the export) outside the timing
        start = time.perf_counter()
        for _ in range(repeat):
            enc.encode(texts)
        seconds = time.perf_counter() - start
    return {**bench_index(ads, d, seed), "encode_backend": backend, "encode_texts": len(texts) * repeat,
            "encode_ads_per_s": round(len(texts) * repeat / seconds)}
