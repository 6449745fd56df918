"""Scoring, Thompson sampling and propensities: the pure maths (numpy only).

The served list is the top-k of one posterior draw. Its propensities are
estimated by Monte-Carlo: ``S`` draws of the user vector, including the served
one, each ranking the same candidate set; the propensity of the ad shown at
position ``j`` is the share of draws that put that ad at ``j``. Because the
served draw is one of the ``S``, every logged propensity is ≥ 1/S, and its
standard error is ``sqrt(π(1 − π)/S)`` (≤ 0.0625 at S = 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streams.updates import sigmoid


@dataclass(frozen=True, slots=True)
class Ranked:
    """One ranked list.

    Attributes
    ----------
    index : ndarray, shape (k,)
        Positions in the candidate arrays, best first.
    score : ndarray, shape (k,)
        Expected value (pCTR × bid) under the served draw.
    propensity : ndarray, shape (k,)
        Probability this policy shows that ad at that position.
    """

    index: np.ndarray
    score: np.ndarray
    propensity: np.ndarray


def sample_users(
    mean: np.ndarray, precision: np.ndarray, draws: int, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw user vectors from ``N(mean, scale² · diag(1/precision))``.

    Parameters
    ----------
    mean, precision : ndarray, shape (D,)
    draws : int
    scale : float
        Exploration temperature; 0 gives the mean every time.
    rng : numpy Generator

    Returns
    -------
    ndarray, shape (draws, D), float32
    """
    noise = rng.standard_normal((draws, mean.shape[0]), dtype=np.float32)
    return (mean[None, :] + scale * noise / np.sqrt(precision)[None, :]).astype(np.float32)


def expected_value(users: np.ndarray, ads: np.ndarray, bids: np.ndarray, bias: float | np.ndarray,
                   dot_scale: float = 1.0) -> np.ndarray:
    """Expected value per click opportunity: ``σ(a · u·p + b) × bid``.

    Parameters
    ----------
    users : ndarray, shape (S, D)
    ads : ndarray, shape (C, D)
    bids : ndarray, shape (C,)
    bias : float or ndarray, shape (C,)
        Logit offset: the prior CTR's, or the learned ranker's per-candidate ``h(x)``.
    dot_scale : float
        ``a``, the ranker's weight on ``u·p`` (1 without a ranker).

    Returns
    -------
    ndarray, shape (S, C)
    """
    return sigmoid(dot_scale * (users @ ads.T) + bias) * bids[None, :]


MIN_BID = 1e-6


def retrieval_keys(ads: np.ndarray, bids: np.ndarray) -> np.ndarray:
    """Index keys that make inner-product search approximate expected-value search.

    At ad click-through rates ``σ(z) ≈ e^z``, so ``log EV ≈ u·p + b + log(bid)``:
    the key ``[p, log bid]`` against the query ``[u, 1]`` orders ads by that.

    Parameters
    ----------
    ads : ndarray, shape (n, D)
    bids : ndarray, shape (n,)

    Returns
    -------
    ndarray, shape (n, D + 1), float32
    """
    log_bid = np.log(np.maximum(bids, MIN_BID)).astype(np.float32)
    return np.hstack([ads.astype(np.float32, copy=False), log_bid[:, None]])


def retrieval_query(user: np.ndarray, bid_weight: float = 1.0) -> np.ndarray:
    """Query for ``retrieval_keys``: ``[u, bid_weight]``, shape (D + 1,); weight 0 is plain similarity."""
    return np.append(user.astype(np.float32, copy=False), np.float32(bid_weight))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of each row, best first.

    Parameters
    ----------
    scores : ndarray, shape (S, C)

    Returns
    -------
    ndarray, shape (S, min(k, C))
    """
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def thompson_rank(
    mean: np.ndarray,
    precision: np.ndarray,
    ads: np.ndarray,
    bids: np.ndarray,
    k: int,
    *,
    bias: float | np.ndarray,
    draws: int,
    scale: float,
    rng: np.random.Generator,
    dot_scale: float = 1.0,
) -> Ranked:
    """Rank candidates by a Thompson draw and estimate each shown ad's propensity.

    Parameters
    ----------
    mean, precision : ndarray, shape (D,)
        The user's posterior.
    ads : ndarray, shape (C, D)
        Candidate ad vectors (projected, unit norm).
    bids : ndarray, shape (C,)
    k : int
        List length (≤ C is enforced by truncation).
    bias : float or ndarray, shape (C,)
        Logit offset per candidate (see ``expected_value``).
    draws : int
        Monte-Carlo draws for the propensities; draw 0 is served.
    scale : float
        Exploration temperature.
    rng : numpy Generator
    dot_scale : float
        The ranker's weight on ``u·p``.

    Returns
    -------
    Ranked
    """
    users = sample_users(mean, precision, draws, scale, rng)
    ev = expected_value(users, ads, bids, bias, dot_scale)
    lists = top_k(ev, k)
    served = lists[0]
    propensity = (lists == served[None, :]).mean(axis=0)
    return Ranked(index=served, score=ev[0, served], propensity=propensity)


def uniform_rank(n: int, k: int, rng: np.random.Generator) -> Ranked:
    """A uniformly random list of ``k`` of ``n`` ads; each position has propensity 1/n."""
    k = min(k, n)
    index = rng.choice(n, size=k, replace=False)
    return Ranked(index=index, score=np.zeros(k), propensity=np.full(k, 1.0 / n))
