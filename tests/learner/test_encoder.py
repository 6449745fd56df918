"""The ad encoder on the real packaged MiniLM: both backends, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import SAMPLE_CATALOG
from learner.encoder import AdEncoder, text_hash

TEXTS = [json.loads(line)["text"] for line in SAMPLE_CATALOG.read_text().splitlines()[:200]]
CATS = [json.loads(line)["category"] for line in SAMPLE_CATALOG.read_text().splitlines()[:200]]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path]:
    cache = tmp_path_factory.mktemp("encoder")
    return AdEncoder("onnx-int8", cache).encode(TEXTS), AdEncoder("torch").encode(TEXTS), cache


# the int8 ONNX export stays close to fp32 MiniLM (the trade for ~2.8x speed) and keeps categories apart
def test_onnx_int8_matches_fp32_closely(both) -> None:
    fast, exact, cache = both
    assert fast.shape == exact.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-4)
    cos = (fast * exact).sum(1)
    assert cos.min() > 0.97 and cos.mean() > 0.985
    cats = sorted(set(CATS))
    labels = np.array([cats.index(c) for c in CATS])
    centroids = np.stack([fast[labels == i].mean(0) for i in range(len(cats))])
    assert ((fast @ centroids.T).argmax(1) == labels).mean() > 0.95
    assert (cache / "all-MiniLM-L6-v2-int8.onnx").is_file()


# a text's vector never depends on the other texts encoded with it (order, batch size)
def test_order_and_batching_do_not_change_vectors(both) -> None:
    fast, _, cache = both
    again = AdEncoder("onnx-int8", cache, batch_size=7).encode(TEXTS[::-1])[::-1]
    np.testing.assert_array_equal(again, fast)


def test_backends_hash_apart_and_bad_backend_is_refused() -> None:
    assert text_hash("boots", "onnx-int8") != text_hash("boots", "torch")
    with pytest.raises(ValueError, match="backend"):
        AdEncoder("tensorrt")
    with pytest.raises(ValueError, match="cache_dir"):
        AdEncoder("onnx-int8")
