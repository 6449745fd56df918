"""``privads bench learn``: so far the ad encoder's throughput (index, training, ranker figures: issue 4)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from learner.encoder import AdEncoder


def bench_learn(catalog: Path, backend: str, repeat: int = 3) -> dict:
    """Encode the catalog's real ad texts ``repeat`` times (after a warm-up); report ads/s."""
    texts = [json.loads(line)["text"] for line in catalog.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="privads-bench-learn-") as tmp:
        enc = AdEncoder(backend, Path(tmp) / "encoder")
        enc.encode(texts[:32])  # load (and, for onnx-int8, build the export) outside the timing
        start = time.perf_counter()
        for _ in range(repeat):
            enc.encode(texts)
        seconds = time.perf_counter() - start
    return {"encode_backend": backend, "encode_texts": len(texts) * repeat,
            "encode_ads_per_s": round(len(texts) * repeat / seconds)}
