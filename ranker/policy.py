"""The serving policies, as pure functions from state and candidates to a ranked list (numpy only).

``ranker.service`` does the I/O (Redis, the index) and calls these; the
replay tools can call them on logged state the same way.

- ``thompson_policy`` — the learned policy (treatment, or a pinned version):
  one posterior draw of the user vector, the ranker's pCTR for it times a drawn
  per-ad calibration factor (``ranker.scoring.AdEvidence``), ranked by expected
  value ``pCTR × bid``; propensities by Monte-Carlo over the same joint draws.
- ``popularity_order`` — the non-personalised control: ads by their posterior
  mean CTR in the arm times the bid; deterministic, so propensity 1.
- ``uniform_rank`` (in ``ranker.scoring``) — the random control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from privads.ranker.model import RankerModel
from privads.ranker.scoring import AdEvidence, Ranked, optimistic_value, popularity_scores, thompson_rank, top_k
from privads.ranker.updates import logit, sigmoid

if TYPE_CHECKING:
    from privads.infra.settings import Settings


@dataclass(frozen=True, slots=True)
class ThompsonParams:
    """Hyper-parameters of the learned policy.

    Attributes
    ----------
    draws : int
        Monte-Carlo draws per request (the served one included).
    scale : float
        Exploration temperature on the user posterior.
    bias : float
        Logit of the prior CTR, used when no ranker is served.
    calibration_strength : float
        The prior weight, in clicks, of each ad's calibration factor (``AdEvidence``).
    shortlist : int
        Candidates that enter the Monte-Carlo (at least 3k): the best by an upper
        confidence bound of their expected value (``ranker.scoring.optimistic_value``).
    """

    draws: int = 64
    scale: float = 1.0
    bias: float = -2.944
    calibration_strength: float = 5.0
    shortlist: int = 50

    @classmethod
    def from_settings(cls, settings: Settings, draws: int | None = None) -> ThompsonParams:
        """The learned policy's hyper-parameters (``draws``: Monte-Carlo draws, ``propensity_draws`` if None)."""
        return cls(draws=settings.propensity_draws if draws is None else draws, scale=settings.exploration,
                   bias=logit(settings.base_rate), calibration_strength=settings.calibration_strength,
                   shortlist=settings.shortlist)


def thompson_policy(
    mean: np.ndarray,
    precision: np.ndarray,
    count: int,
    ads: np.ndarray,
    bids: np.ndarray,
    category_ids: np.ndarray,
    context: list[int],
    ranker: RankerModel | None,
    clicks: np.ndarray,
    expected: np.ndarray,
    k: int,
    params: ThompsonParams,
    rng: np.random.Generator,
    logits: np.ndarray | None = None,
) -> Ranked:
    """Rank retrieved candidates for one request with Thompson sampling.

    Parameters
    ----------
    mean, precision : ndarray, shape (D,)
        The user's posterior (the population prior for unknown users).
    count : int
        Labelled impressions the user's vector has learned from.
    ads : ndarray, shape (C, D)
        Projected candidate vectors.
    bids : ndarray, shape (C,)
    category_ids : ndarray of int, shape (C,)
    context : list of int
        Hashed request-context tokens (``ranker.features.context_ids``).
    ranker : RankerModel or None
        None: ``σ(u·p + bias)``, the stream's own model.
    clicks, expected : ndarray, shape (C,)
        The candidates' clicks in this arm and the clicks the served models predicted
        for their impressions (``AdEvidence``).
    k : int
    params : ThompsonParams
    rng : numpy Generator
    logits : ndarray, shape (C,), optional
        ``candidate_logits`` of these inputs, when already computed (they are deterministic).

    Returns
    -------
    Ranked
        Positions in the candidate arrays, expected values and propensities.
    """
    bias: float | np.ndarray = params.bias
    dot_scale = 1.0
    if ranker is not None:
        bias = logits if logits is not None else candidate_logits(ranker, mean, count, ads, bids, category_ids,
                                                                   context)
        dot_scale = ranker.dot_weight
    evidence = AdEvidence(clicks, expected, params.calibration_strength)
    shortlist = max(params.shortlist, 3 * k)
    keep = None
    if ads.shape[0] > shortlist:
        # Monte-Carlo over all 500 costs 500 Gamma draws × S; an ad outside the top by optimistic value
        # almost never wins a draw, and the cut is a deterministic function of the state, so the
        # propensities stay those of the policy actually run
        ucb = optimistic_value(mean, precision, ads, bids, bias, dot_scale=dot_scale, scale=params.scale,
                               evidence=evidence)
        keep = top_k(ucb[None, :], shortlist)[0]
        ads, bias, evidence = ads[keep], _take(bias, keep), evidence.take(keep)
        bids = bids[keep]
    ranked = thompson_rank(mean, precision, ads, bids, k, bias=bias, draws=params.draws, scale=params.scale,
                           rng=rng, dot_scale=dot_scale, evidence=evidence)
    shown = ranked.index
    pctr = sigmoid(dot_scale * (ads[shown] @ mean) + _take(bias, shown))
    if keep is None:
        return Ranked(shown, ranked.score, ranked.propensity, ranked.lists, pctr)
    return Ranked(keep[shown], ranked.score, ranked.propensity, None if ranked.lists is None
                  else keep[ranked.lists], pctr)


def candidate_logits(ranker: RankerModel, mean: np.ndarray, count: int, ads: np.ndarray, bids: np.ndarray,
                     category_ids: np.ndarray, context: np.ndarray) -> np.ndarray:
    """The ranker's ``h(x)`` of each candidate at the posterior mean, shape (C,): the deterministic part."""
    return ranker.request_logits(mean, count, ads, bids, category_ids, context)


def _take(bias: float | np.ndarray, keep: np.ndarray) -> float | np.ndarray:
    return bias[keep] if isinstance(bias, np.ndarray) else bias


def popularity_order(
    clicks: np.ndarray, impressions: np.ndarray, bids: np.ndarray, active: np.ndarray, prior_ctr: float,
    strength: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best active ads by posterior-mean CTR × bid.

    Parameters
    ----------
    clicks, impressions, bids : ndarray, shape (N,)
        Per catalog row, counts from the arm's own traffic.
    active : ndarray of bool, shape (N,)
    prior_ctr, strength : float
        The Beta prior: mean CTR and its weight in impressions.
    n : int

    Returns
    -------
    rows : ndarray of int, shape (≤ n,)
        Catalog rows, best first.
    scores : ndarray, shape (≤ n,)
    """
    scores = popularity_scores(clicks, impressions, bids, prior_ctr, strength)
    on = np.flatnonzero(active)
    if on.size == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    best = on[top_k(scores[on][None, :], n)[0]]
    return best, scores[best]


def counts_by_row(counts: dict[str, tuple[int, ...]], row: dict[str, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter ``ad id → (clicks, shown, …)`` onto catalog rows; unknown ids are ignored.

    Returns
    -------
    clicks, impressions : ndarray of int, shape (n,)
    """
    clicks, impressions = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for ad_id, (c, m, *_) in counts.items():
        r = row.get(ad_id)
        if r is not None and r < n:
            clicks[r], impressions[r] = c, m
    return clicks, impressions


def describe(params: ThompsonParams) -> dict[str, Any]:
    """What ``/model`` shows of the exploration."""
    return {"draws": params.draws, "scale": params.scale, "calibration_strength": params.calibration_strength,
            "shortlist": params.shortlist,
            "propensity_se_max": round(0.5 / np.sqrt(params.draws), 4)}
