"""The projector from ad-text space (384-d) into the user space (D-d): pure numpy inference.

Training lives in ``learner.train``; serving and the workers only need ``project``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Projector:
    """A linear map with L2-normalised output: ``p = normalise(x W + b)``.

    Attributes
    ----------
    weight : ndarray, shape (d_ad, d_user)
    bias : ndarray, shape (d_user,)
    """

    weight: np.ndarray
    bias: np.ndarray

    @property
    def d_user(self) -> int:
        return int(self.weight.shape[1])

    def project(self, x: np.ndarray) -> np.ndarray:
        """Project ad embeddings.

        Parameters
        ----------
        x : ndarray, shape (n, d_ad)

        Returns
        -------
        ndarray, shape (n, d_user), float32, unit-norm rows
        """
        y = x.astype(np.float32, copy=False) @ self.weight + self.bias
        norm = np.linalg.norm(y, axis=1, keepdims=True)
        return (y / np.maximum(norm, 1e-12)).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(path, weight=self.weight, bias=self.bias)

    @classmethod
    def load(cls, path: Path) -> Projector:
        with np.load(path) as z:
            return cls(weight=z["weight"].astype(np.float32), bias=z["bias"].astype(np.float32))


def initial_projector(d_ad: int, d_user: int, seed: int) -> Projector:
    """A seeded random orthonormal projection: preserves the text space's geometry (Johnson–Lindenstrauss).

    Parameters
    ----------
    d_ad, d_user : int
        Input and output dimensions (``d_user ≤ d_ad``).
    seed : int
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d_ad, d_user)))
    return Projector(weight=q.astype(np.float32), bias=np.zeros(d_user, dtype=np.float32))
