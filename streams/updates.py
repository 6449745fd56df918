"""Online user learning: the pure maths (numpy only, no I/O).

A user is a Gaussian over its embedding ``u ∈ R^D`` with mean ``m`` and a
diagonal precision ``q``. Each labelled impression ``(p, y)`` with ``p`` the
projected ad vector (unit norm) and ``y ∈ {0, 1}`` the click updates it:

* mean: one clipped gradient step on the logistic loss of ``z = m·p + b`` with an
  L2 pull toward the population mean ``μ``::

      g = (σ(z) − y)·p + λ·(m − μ);   m ← m − clip(η·g, max_step)

* precision: the diagonal Laplace update of Bayesian logistic regression
  (Chapelle & Li, 2011): ``q ← q + σ(z)(1 − σ(z))·p²``.

Thompson sampling draws ``u ~ N(m, diag(1/q))`` (see ``ranker.scoring``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class UpdateParams:
    """Hyper-parameters of one online update."""

    learning_rate: float
    max_step: float
    l2_prior: float
    bias: float


def sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))


def logit(p: float) -> float:
    """Inverse of the logistic function; ``p`` in (0, 1)."""
    return float(np.log(p / (1.0 - p)))


def update_user(
    mean: np.ndarray,
    precision: np.ndarray,
    ads: np.ndarray,
    clicked: np.ndarray,
    prior_mean: np.ndarray,
    params: UpdateParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a user's labelled impressions in order.

    Parameters
    ----------
    mean : ndarray, shape (D,)
        Posterior mean before the updates.
    precision : ndarray, shape (D,)
        Diagonal posterior precision before the updates (all > 0).
    ads : ndarray, shape (n, D)
        Projected vectors of the ads shown, in event order.
    clicked : ndarray, shape (n,)
        1 where the impression was clicked, else 0.
    prior_mean : ndarray, shape (D,)
        Population mean that the L2 term pulls toward.
    params : UpdateParams

    Returns
    -------
    mean, precision : ndarray, shape (D,)
        New arrays (float32); the inputs are not modified.
    """
    m = mean.astype(np.float64, copy=True)
    q = precision.astype(np.float64, copy=True)
    mu = prior_mean.astype(np.float64, copy=False)
    for p, y in zip(ads.astype(np.float64, copy=False), clicked):
        s = float(sigmoid(m @ p + params.bias))
        step = params.learning_rate * ((s - float(y)) * p + params.l2_prior * (m - mu))
        norm = float(np.linalg.norm(step))
        if norm > params.max_step:
            step *= params.max_step / norm
        m -= step
        q += s * (1.0 - s) * p * p
    return m.astype(np.float32), q.astype(np.float32)
