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


def initial_projector(d_ad: int, d_user: int, seed: int, embeddings: np.ndarray | None = None,
                      sample: int = 50_000) -> Projector:
    """The projector a deployment starts from, before any user is learned.

    Without ``embeddings``: a seeded random orthonormal projection, which keeps
    the text space's geometry (Johnson–Lindenstrauss). With the catalog's text
    embeddings: centred on their mean, onto their ``d_user`` principal
    directions (completed with seeded random orthonormal ones when the catalog
    spans fewer). Sentence embeddings share a large common direction (every pair
    of MiniLM ad texts has cosine ≈ 0.13 whatever the topics); left in, it is a
    component every ad has, so a user who clicks one topic raises every ad.
    Removing it and keeping the directions along which ads differ ("all-but-the-top",
    Mu & Viswanath, ICLR 2018) is what makes ads of different topics nearly
    orthogonal in the user space (measured in ``BENCHMARKS.md``).

    Parameters
    ----------
    d_ad, d_user : int
        Input and output dimensions (``d_user ≤ d_ad``).
    seed : int
        Seeds the random directions and the subsample.
    embeddings : ndarray, shape (n, d_ad), optional
        The catalog's ad-text embeddings; fewer than 2 rows count as none.
    sample : int
        At most this many rows (a seeded subsample) estimate the directions.
    """
    rng = np.random.default_rng(seed)
    if embeddings is None or embeddings.shape[0] < 2:
        q, _ = np.linalg.qr(rng.standard_normal((d_ad, d_user)))
        return Projector(weight=q.astype(np.float32), bias=np.zeros(d_user, dtype=np.float32))
    x = np.asarray(embeddings, np.float64)
    if x.shape[0] > sample:
        x = x[np.sort(rng.choice(x.shape[0], sample, replace=False))]
    mu = x.mean(axis=0)
    centred = x - mu
    values, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    order = np.argsort(-values, kind="stable")
    rank = int((values > 1e-9 * max(float(values.max()), 1e-30)).sum())
    top = vectors[:, order[:min(d_user, rank)]]
    # an eigenvector's sign is arbitrary (LAPACK's choice): fix it so the same catalog gives the same map
    top = top * np.sign(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])])
    if top.shape[1] < d_user:
        fill = rng.standard_normal((d_ad, d_user - top.shape[1]))
        fill -= top @ (top.T @ fill)
        q, _ = np.linalg.qr(fill)
        top = np.hstack([top, q])
    return Projector(weight=top.astype(np.float32), bias=(-(mu @ top)).astype(np.float32))
