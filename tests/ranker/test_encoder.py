"""The ad encoder on the real packaged MiniLM: both backends, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import SAMPLE_CATALOG
from privads.ranker.encoder import (
    ONNX_FILE,
    AdEncoder,
    _build_graph,
    _sentence_transformer,
    _session,
    encoder_input,
    text_hash,
)

TEXTS = [json.loads(line)["text"] for line in SAMPLE_CATALOG.read_text().splitlines()[:200]]
CATS = [json.loads(line)["category"] for line in SAMPLE_CATALOG.read_text().splitlines()[:200]]
# ads are at most 2000 characters: far past the model's 256-token window, which both backends must cut alike
LONG = ("Hand-stitched full-grain leather Chelsea boots with a waterproof lining, cushioned insoles and a "
        "lifetime resoling guarantee; free returns within 60 days. ") * 12


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path]:
    cache = tmp_path_factory.mktemp("encoder")
    return AdEncoder("onnx-int8", cache).encode(TEXTS), AdEncoder("torch").encode(TEXTS), cache


# the int8 ONNX graph stays close to fp32 MiniLM (the trade for its speed) and keeps categories apart
def test_onnx_int8_matches_fp32_closely(both) -> None:
    fast, exact, cache = both
    assert fast.shape == exact.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-4)
    cos = (fast * exact).sum(1)
    assert cos.min() > 0.98 and cos.mean() > 0.99
    cats = sorted(set(CATS))
    labels = np.array([cats.index(c) for c in CATS])
    centroids = np.stack([fast[labels == i].mean(0) for i in range(len(cats))])
    assert ((fast @ centroids.T).argmax(1) == labels).mean() > 0.95
    assert (cache / ONNX_FILE).is_file()


# the hand-written graph is MiniLM itself: in fp32 it reproduces sentence-transformers
def test_fp32_graph_reproduces_sentence_transformers(both) -> None:
    _, exact, _ = both
    st = _sentence_transformer()
    session = _session(_build_graph(st, quantize=False).SerializeToString())
    ids = st.tokenizer(TEXTS[:40], truncation=True, max_length=st.max_seq_length)["input_ids"]
    got = np.concatenate([session.run(None, {"ids": np.asarray(row, dtype=np.int64)[None, :]})[0] for row in ids])
    np.testing.assert_allclose(got, exact[:40], atol=1e-5)


# a text's vector never depends on the other texts encoded with it (order, batch size, threads, alone)
def test_order_and_batching_do_not_change_vectors(both) -> None:
    fast, _, cache = both
    again = AdEncoder("onnx-int8", cache, batch_size=7).encode(TEXTS[::-1])[::-1]
    np.testing.assert_array_equal(again, fast)
    one = AdEncoder("onnx-int8", cache, threads=1)
    for i in (0, 17, 199):
        np.testing.assert_array_equal(one.encode([TEXTS[i]])[0], fast[i])
    mixed = one.encode([LONG, TEXTS[3], "", TEXTS[5]])
    np.testing.assert_array_equal(mixed[[1, 3]], fast[[3, 5]])


# long ads are cut at max_seq_length (256 tokens) like sentence-transformers cuts them, and stay close to fp32
def test_long_texts_are_truncated_like_sentence_transformers(tmp_path: Path) -> None:
    st = _sentence_transformer()
    assert len(LONG) <= 2000 and len(st.tokenizer(LONG)["input_ids"]) > st.max_seq_length == 256
    fast = AdEncoder("onnx-int8", tmp_path)
    words = "boots " * 400  # one token a word: [CLS] + 254 x boots + [SEP] fills the window
    a, b, c = fast.encode([words, "boots " * 254, "boots " * 253])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)
    vecs = fast.encode([LONG, words])
    exact = AdEncoder("torch").encode([LONG, words])
    assert ((vecs * exact).sum(1) > 0.98).all()


def test_backends_hash_apart_and_bad_backend_is_refused() -> None:
    assert text_hash("boots", "onnx-int8") != text_hash("boots", "torch")
    with pytest.raises(ValueError, match="backend"):
        AdEncoder("tensorrt")
    with pytest.raises(ValueError, match="cache_dir"):
        AdEncoder("onnx-int8")


def test_the_encoder_reads_an_ads_category_then_its_text() -> None:
    assert encoder_input("rgb gaming chair", "gaming") == "gaming: rgb gaming chair"
    # no category (None, or empty as the store keeps a missing one): the text alone, as before categories were read
    assert encoder_input("rgb gaming chair", None) == "rgb gaming chair"
    assert encoder_input("rgb gaming chair", "") == "rgb gaming chair"
    # so the same text under two categories is two cache entries
    assert text_hash(encoder_input("gift card", "gaming")) != text_hash(encoder_input("gift card", "coffee & tea"))


def test_a_shared_category_pulls_ads_of_a_kind_together() -> None:
    """Text alone puts the head torch nearer a coffee ad (a shared suffix) than the sleeping bag; its category not."""
    enc = AdEncoder("torch")
    a, b, other = ("insulated sleeping bag best seller", "lightweight head torch for families",
                   "freshly roasted french press for families")
    plain = enc.encode([a, b, other])
    read = enc.encode([encoder_input(a, "hiking"), encoder_input(b, "hiking"), encoder_input(other, "coffee")])
    assert plain[1] @ plain[0] < plain[1] @ plain[2]  # text alone: the suffix "for families" wins (0.10 < 0.18)
    assert read[1] @ read[0] > read[1] @ read[2]  # the category read: the kind wins (0.34 > 0.17)
