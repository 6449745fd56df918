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

The stream applies each step in two halves (``learn_events``): the label-free
half when the impression arrives, ``−y·p`` when its click does, so that a
non-click teaches the user within a second and a late click completes the
same step a labelled impression would have taken.

Differential privacy (optional, per event): each example's gradient is clipped
to norm ``C`` and Gaussian noise ``N(0, (σC)² I)`` is added before the step, so
one event moves a user's vector by a bounded, noised amount; ``dp_epsilon``
accounts the (ε, δ) of a user's vector after ``T`` updates (Rényi DP of the
Gaussian mechanism, composed over T steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import numpy as np

if TYPE_CHECKING:
    from privads.infra.settings import Settings


# the two halves of a labelled impression (``learn_events``): served, and clicked
IMPRESSION = 0
CLICK = 1


@dataclass(frozen=True, slots=True)
class UpdateParams:
    """Hyper-parameters of one online update."""

    learning_rate: float
    max_step: float
    l2_prior: float
    bias: float
    dp_clip: float | None = None
    dp_noise: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> UpdateParams:
        """The stream's online-update hyper-parameters."""
        return cls(learning_rate=settings.learning_rate, max_step=settings.max_step, l2_prior=settings.l2_prior,
                   bias=logit(settings.base_rate), dp_clip=settings.dp_clip, dp_noise=settings.dp_noise)


@overload
def sigmoid(z: np.ndarray) -> np.ndarray: ...


@overload
def sigmoid(z: float) -> float: ...


def sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    """Numerically stable logistic function (a float for a scalar: numpy returns a ufunc's 0-d result as a scalar)."""
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
    for p, y in zip(ads.astype(np.float64, copy=False), clicked, strict=True):
        s = float(sigmoid(m @ p + params.bias))
        step = params.learning_rate * ((s - float(y)) * p + params.l2_prior * (m - mu))
        norm = float(np.linalg.norm(step))
        if norm > params.max_step:
            step *= params.max_step / norm
        m -= step
        q += s * (1.0 - s) * p * p
    return m.astype(np.float32), q.astype(np.float32)


def update_many(
    mean: np.ndarray,
    precision: np.ndarray,
    user_index: np.ndarray,
    ads: np.ndarray,
    clicked: np.ndarray,
    prior_mean: np.ndarray,
    params: UpdateParams,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply many users' labelled impressions, vectorised across users.

    Each user's examples are applied in the order given, as ``update_user``
    would; round ``r`` updates, at once, every user's ``r``-th example.

    Parameters
    ----------
    mean, precision : ndarray, shape (U, D)
        Posteriors of the U users touched (float32; not modified).
    user_index : ndarray of int, shape (n,)
        Row of ``mean`` that each example belongs to, in event order.
    ads : ndarray, shape (n, D)
        Projected ad vector of each example.
    clicked : ndarray, shape (n,)
    prior_mean : ndarray, shape (D,)
    params : UpdateParams
    rng : numpy Generator, optional
        Required when ``params.dp_clip`` is set (the DP noise).

    Returns
    -------
    mean, precision : ndarray, shape (U, D), float32
    """
    n = user_index.shape[0]
    return _rounds(mean, precision, user_index, ads, np.ones(n), np.asarray(clicked, np.float64), np.ones(n),
                   prior_mean, params, rng)


def learn_events(
    mean: np.ndarray,
    precision: np.ndarray,
    user_index: np.ndarray,
    ads: np.ndarray,
    kinds: np.ndarray,
    prior_mean: np.ndarray,
    params: UpdateParams,
    rng: np.random.Generator | None = None,
    offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fast negatives: learn from an impression when it is served and from its click when (if) it comes.

    The logistic step of a labelled impression splits exactly into a part that
    does not depend on the label and a part that exists only for a click::

        (σ(z) − y)·p + λ(m − μ)  =  [σ(z)·p + λ(m − μ)]  −  y·p
                                     IMPRESSION            CLICK

    An ``IMPRESSION`` event takes the first part (the step of a negative) and the
    whole Laplace precision term ``σ(1 − σ)·p²``, which is label-free too; a
    ``CLICK`` event takes ``−p``: a step of ``η·p`` toward the ad, no precision.
    Every impression thus counts as a negative within the second it is served,
    and a click, however late within its window, turns it into exactly the
    positive ``update_many`` would have applied (``σ`` taken at the impression,
    each half clipped to ``max_step`` on its own). Nothing is ever undone, so
    no label is wrong for long and no correction can overshoot; an impression
    never clicked needs nothing more when its window closes.

    Parameters
    ----------
    mean, precision : ndarray, shape (U, D)
        Posteriors of the U users touched (float32; not modified).
    user_index : ndarray of int, shape (n,)
        Row of ``mean`` that each event belongs to, in event order.
    ads : ndarray, shape (n, D)
        Projected ad vector of each event.
    kinds : ndarray of int, shape (n,)
        ``IMPRESSION`` or ``CLICK`` per event.
    prior_mean : ndarray, shape (D,)
    params : UpdateParams
    rng : numpy Generator, optional
        Required when ``params.dp_clip`` is set (each half is clipped and noised as one event).
    offset : ndarray, shape (n,), optional
        A known logit added to ``z`` per event: the log of the ad's calibration
        factor (``ranker.scoring.AdEvidence``), as serving multiplies it in, so
        that a user learns what is particular to them and leaves to the ad's
        evidence what every user shares (an ad nobody clicks does not have to
        be unlearned by each user in turn).

    Returns
    -------
    mean, precision : ndarray, shape (U, D), float32
    """
    kinds = np.asarray(kinds)
    if not np.isin(kinds, (IMPRESSION, CLICK)).all():
        raise ValueError("kinds must be IMPRESSION or CLICK")
    impression = (kinds == IMPRESSION).astype(np.float64)
    return _rounds(mean, precision, user_index, ads, impression, 1.0 - impression, impression,
                   prior_mean, params, rng, offset)


def _rounds(
    mean: np.ndarray,
    precision: np.ndarray,
    user_index: np.ndarray,
    ads: np.ndarray,
    w_sigma: np.ndarray,
    y: np.ndarray,
    label_free: np.ndarray,
    prior_mean: np.ndarray,
    params: UpdateParams,
    rng: np.random.Generator | None,
    offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``−η·clip((w_σ·σ(z) − y)·p + f·λ(m − μ))`` and ``q += f·σ(1 − σ)·p²``, per user in order.

    ``w_sigma``, ``y`` and ``label_free`` (``f``) are per example, shape (n,): a
    labelled impression is (1, y, 1), an impression's half (1, 0, 1), a click's (0, 1, 0).
    ``z = m·p + bias + offset`` (offset per example, 0 if None).
    """
    m = mean.astype(np.float64, copy=True)
    q = precision.astype(np.float64, copy=True)
    if user_index.size == 0:
        return m.astype(np.float32), q.astype(np.float32)
    mu = prior_mean.astype(np.float64, copy=False)
    p_all = ads.astype(np.float64, copy=False)
    off = np.zeros(user_index.shape[0]) if offset is None else np.asarray(offset, np.float64)
    # rank of each example among its user's examples: 0 for the first, 1 for the second, ...
    order = np.argsort(user_index, kind="stable")
    sorted_users = user_index[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_users.size]))
    rank = np.empty_like(user_index)
    rank[order] = np.arange(sorted_users.size) - group_start
    if params.dp_clip is not None and rng is None:
        raise ValueError("rng is required for differentially private updates")
    for r in range(int(rank.max()) + 1):
        idx = np.flatnonzero(rank == r)
        u = user_index[idx]
        p, f = p_all[idx], label_free[idx][:, None]
        s = sigmoid(np.einsum("ij,ij->i", m[u], p) + params.bias + off[idx])
        grad = (w_sigma[idx] * s - y[idx])[:, None] * p + f * params.l2_prior * (m[u] - mu)
        if params.dp_clip is not None:
            assert rng is not None  # checked before the loop
            gnorm = np.linalg.norm(grad, axis=1, keepdims=True)
            grad *= np.minimum(1.0, params.dp_clip / np.maximum(gnorm, 1e-12))
            grad += rng.standard_normal(grad.shape) * (params.dp_noise * params.dp_clip)
        step = params.learning_rate * grad
        norm = np.linalg.norm(step, axis=1, keepdims=True)
        step *= np.minimum(1.0, params.max_step / np.maximum(norm, 1e-12))
        m[u] -= step
        q[u] += f * (s * (1.0 - s))[:, None] * p * p
    return m.astype(np.float32), q.astype(np.float32)


def noise_rng(private: bool, seed: int) -> np.random.Generator:
    """The generator of the updates' noise: from the operating system's entropy when ``private``.

    DP noise that ``seed`` reproduces (the same on every worker and restart) is no noise
    to anyone who reads the code and the settings: they could subtract it. Without DP
    the updates draw nothing, and the seeded generator keeps runs reproducible.
    """
    return np.random.default_rng(None if private else seed)  # None: a SeedSequence from os.urandom


def dp_epsilon(steps: int, noise_multiplier: float, delta: float) -> float:
    """ε of a user's vector after ``steps`` clipped, noised updates, at the given δ.

    Rényi DP of the Gaussian mechanism (sensitivity C, noise σC): ``α/(2σ²)``
    per step at order α, composed over the steps, converted with
    ``ε = RDP(α) + log(1/δ)/(α − 1)`` minimised over α.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    alphas = np.concatenate([np.linspace(1.01, 10, 200), np.linspace(10, 1000, 400)])
    eps = steps * alphas / (2 * noise_multiplier**2) + np.log(1 / delta) / (alphas - 1)
    return float(eps.min())


def ad_posterior(
    clicks: np.ndarray, labelled: np.ndarray, base_rate: float, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Beta posterior of each ad's CTR from its labelled impressions.

    The prior is ``Beta(base_rate · strength, (1 − base_rate) · strength)``: a
    cold ad starts at the global base rate, worth ``strength`` impressions.

    Parameters
    ----------
    clicks, labelled : ndarray of int, shape (n,)
        Clicked and labelled (clicked or window closed) impressions per ad.
    base_rate : float
        Prior mean CTR, in (0, 1).
    strength : float
        Prior pseudo-impressions, > 0.

    Returns
    -------
    alpha, beta : ndarray, shape (n,)
    """
    clicks = np.asarray(clicks, dtype=np.float64)
    labelled = np.asarray(labelled, dtype=np.float64)
    return base_rate * strength + clicks, (1.0 - base_rate) * strength + (labelled - clicks)


def population_prior(total: np.ndarray, users: int, strength: float) -> np.ndarray:
    """The prior mean of a user the stream has not learned: what the learned users' means average to.

    ``Σ m_u / (n + n₀)``: the mean of the ``n`` learned users' vectors, shrunk
    toward the zero vector as if ``n₀ = strength`` users sat there, so that a
    handful of early users cannot set everyone's start.

    Parameters
    ----------
    total : ndarray, shape (D,)
        Sum of the learned users' posterior means.
    users : int
        How many users the sum holds (≥ 0).
    strength : float
        ``n₀`` ≥ 0; 0 with no users gives the zero vector.

    Returns
    -------
    ndarray, shape (D,), float32
    """
    if users < 0 or strength < 0:
        raise ValueError("users and strength must be ≥ 0")
    denom = users + strength
    return (np.asarray(total, np.float64) / denom if denom > 0 else np.zeros_like(total, np.float64)).astype(np.float32)
