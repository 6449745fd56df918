"""Ranking policies: one interface for serving, ``privads bench policies`` and offline replay (numpy only).

A policy ranks one request's candidates, a ``Slate``, into a list of k ads with the
probability it had of showing each one at its position (``scoring.Ranked``). The
shape is river's bandit policies (``river.bandit.base.Policy``: a public ``pull`` over an
abstract ``_pull``): the public ``Policy.rank`` checks its input and treats the empty slate
once, for every policy; a policy overrides ``_rank`` alone.

- ``ThompsonPolicy`` — the learned policy (treatment, or a pinned version):
  one posterior draw of the user vector, the ranker's pCTR for it times a drawn
  per-ad calibration factor (``ranker.scoring.AdEvidence``), ranked by expected
  value ``pCTR × bid``; propensities by Monte-Carlo over the same joint draws.
- ``PopularityPolicy`` — the non-personalised control: ads by their posterior
  mean CTR in the arm times the bid; deterministic, so propensity 1.
- ``UniformPolicy`` — the random control: k distinct candidates, uniformly.

The bench's peers (``bench.peers``) subclass ``Policy`` too, and learn in process
through ``Policy.learn``; the served policies learn in the stream workers, so theirs
does nothing. Offline replay (``learner.replay``) evaluates any policy through
``Policy.sample_lists``: draws of its list, whose per-slot shares are π(ad | slot).
``tests/ranker/test_policy.py`` checks every policy generically.

``ranker.service`` does the I/O (Redis, the index) and builds the slates; the
replay tools build them from logged state the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from privads.infra.errors import InvalidInput
from privads.ranker.model import RankerModel
from privads.ranker.scoring import (
    AdEvidence,
    Ranked,
    fixed_rank,
    optimistic_value,
    popularity_scores,
    thompson_rank,
    top_k,
    uniform_rank,
)
from privads.ranker.updates import logit, sigmoid

if TYPE_CHECKING:
    from privads.infra.settings import Settings

NO_CONTEXT = np.zeros(0, np.int64)


@dataclass(frozen=True, slots=True)
class Slate:
    """What a policy sees of one request: the candidates it may show, and what is known of them and the user.

    Only ``rows`` is required; a policy that needs a field the caller left out
    says which (``need``).

    Attributes
    ----------
    rows : ndarray of int, shape (C,)
        The candidates' ids in the caller's catalog (serving: catalog rows; the bench: ad indices).
    user : str or int
        The user's id (a policy that keeps its own per-user state keys it by this).
    mean, precision : ndarray, shape (D,), optional
        The user's posterior (the population prior for unknown users).
    count : int
        Labelled impressions the user's vector has learned from.
    vectors : ndarray, shape (C, D), optional
        Projected candidate vectors.
    bids : ndarray, shape (C,), optional
    category_ids : ndarray of int, shape (C,), optional
    context : ndarray of int, shape (T,)
        Hashed request-context tokens (``ranker.features.context_ids``).
    clicks, shown, expected : ndarray, shape (C,), optional
        The candidates' clicks, impressions and the clicks the served models
        predicted for those impressions, in the user's arm (``AdEvidence``).
    logits : ndarray, shape (C,), optional
        The ranker's ``h(x)`` of the candidates at the posterior mean, when already
        computed (``candidate_logits``: deterministic given the state).
    prior_factor : ndarray, shape (C,), optional
        The prior mean of each candidate's calibration factor: its category's pooled
        factor in the arm (``scoring.category_factors``); None: 1.
    user_factor : ndarray, shape (C,), optional
        The user's own factor on each candidate's category (``scoring.user_factors``),
        multiplied into the calibration factor; None: 1.
    """

    rows: np.ndarray
    user: str | int = ""
    mean: np.ndarray | None = None
    precision: np.ndarray | None = None
    count: int = 0
    vectors: np.ndarray | None = None
    bids: np.ndarray | None = None
    category_ids: np.ndarray | None = None
    context: np.ndarray = field(default_factory=lambda: NO_CONTEXT)
    clicks: np.ndarray | None = None
    shown: np.ndarray | None = None
    expected: np.ndarray | None = None
    logits: np.ndarray | None = None
    prior_factor: np.ndarray | None = None
    user_factor: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def need(self, *names: str) -> list[np.ndarray]:
        """The named fields, or ``InvalidInput`` naming the first one the caller did not give."""
        out = []
        for name in names:
            value = getattr(self, name)
            if value is None:
                raise InvalidInput(f"slate.{name}: this policy needs it and the request's slate has none")
            out.append(value)
        return out


EMPTY = Ranked(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


class Policy(abc.ABC):
    """A ranking policy: ``rank`` one request's slate into k ads with their propensities.

    Subclasses override ``_rank`` (and ``learn`` if they learn in process). Class
    attributes say what offline evaluation may assume: a ``deterministic`` policy's
    one list is its distribution; a ``uniform`` one shows every candidate at every
    slot with probability 1/C.
    """

    name: ClassVar[str] = "policy"
    deterministic: ClassVar[bool] = False
    uniform: ClassVar[bool] = False

    def rank(self, slate: Slate, k: int) -> Ranked:
        """The list to show: at most ``k`` distinct candidates, best first.

        Returns
        -------
        Ranked
            ``index`` holds positions in the slate's arrays; ``propensity[j]`` is the
            probability this policy had of showing ``index[j]`` at position ``j``.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InvalidInput(f"k: must be a positive integer, got {k!r}")
        if slate.size == 0:
            return EMPTY
        return self._rank(slate, min(int(k), slate.size))

    @abc.abstractmethod
    def _rank(self, slate: Slate, k: int) -> Ranked:
        """Rank a non-empty slate; ``1 ≤ k ≤ slate.size``."""

    def learn(self, slate: Slate, ranked: Ranked, clicked: np.ndarray) -> None:
        """See how a served list did (``clicked``: bool, shape (len(ranked.index),)).

        The served policies learn in the stream workers, from the events; a policy
        that learns in process (the bench's peers) overrides this.
        """
        return None

    def sample_lists(self, slate: Slate, k: int, draws: int) -> np.ndarray:
        """Independent lists this policy could show, shape (draws, ≤ k): positions in the slate.

        What offline evaluation counts to get π(ad | slot). A deterministic policy
        returns its one list (shape (1, ≤ k)); a Monte-Carlo policy overrides this
        to return the draws it makes anyway.
        """
        return np.stack([self.rank(slate, k).index for _ in range(1 if self.deterministic else draws)])

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
    context: np.ndarray,
    ranker: RankerModel | None,
    clicks: np.ndarray,
    expected: np.ndarray,
    k: int,
    params: ThompsonParams,
    rng: np.random.Generator,
    logits: np.ndarray | None = None,
    prior_factor: np.ndarray | None = None,
    user_factor: np.ndarray | None = None,
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
    context : ndarray of int, shape (T,)
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
    prior_factor : ndarray, shape (C,), optional
        The prior mean of each candidate's calibration factor (``AdEvidence.prior``).
    user_factor : ndarray, shape (C,), optional
        The user's own factor on each candidate's category (``AdEvidence.scaled``).

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
    evidence = AdEvidence(clicks, expected, params.calibration_strength, prior_factor)
    if user_factor is not None:
        evidence = evidence.scaled(user_factor)
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
        user_factor = None if user_factor is None else user_factor[keep]
    ranked = thompson_rank(mean, precision, ads, bids, k, bias=bias, draws=params.draws, scale=params.scale,
                           rng=rng, dot_scale=dot_scale, evidence=evidence)
    shown = ranked.index
    pctr = sigmoid(dot_scale * (ads[shown] @ mean) + _take(bias, shown))
    factor = evidence.take(shown).mean()
    mine = None if user_factor is None else user_factor[shown]
    if keep is None:
        return Ranked(shown, ranked.score, ranked.propensity, ranked.lists, pctr, factor, ranked.parts, mine)
    return Ranked(keep[shown], ranked.score, ranked.propensity, None if ranked.lists is None
                  else keep[ranked.lists], pctr, factor, ranked.parts, mine)


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


def counts_by_row(counts: Mapping[str, tuple[int, ...]], row: Mapping[str, int],
                  n: int) -> tuple[np.ndarray, np.ndarray]:
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


class ThompsonPolicy(Policy):
    """The learned policy (``thompson_policy``) over one model version's ranker.

    Needs the slate's user posterior, vectors, bids, category ids and the arm's
    ``clicks`` and ``expected``; uses its ``logits`` when given.
    """

    name = "thompson"

    def __init__(self, params: ThompsonParams, ranker: RankerModel | None, rng: np.random.Generator) -> None:
        self.params, self.ranker, self.rng = params, ranker, rng

    def _rank(self, slate: Slate, k: int) -> Ranked:
        return self._draw(slate, k, self.params)

    def _draw(self, slate: Slate, k: int, params: ThompsonParams) -> Ranked:
        mean, precision, ads, bids, categories, clicks, expected = slate.need(
            "mean", "precision", "vectors", "bids", "category_ids", "clicks", "expected")
        return thompson_policy(mean, precision, slate.count, ads, bids, categories, slate.context, self.ranker,
                               clicks, expected, k, params, self.rng, logits=slate.logits,
                               prior_factor=slate.prior_factor, user_factor=slate.user_factor)

    def sample_lists(self, slate: Slate, k: int, draws: int) -> np.ndarray:
        """The Monte-Carlo lists of one call with ``draws`` joint draws (the served one among them)."""
        if slate.size == 0:
            return np.zeros((draws, 0), np.int64)
        lists = self._draw(slate, min(k, slate.size), replace(self.params, draws=draws)).lists
        assert lists is not None  # thompson_rank always returns its draws
        return lists


class PopularityPolicy(Policy):
    """Ads by their posterior-mean CTR in the arm times the bid (Beta prior ``prior_ctr`` worth ``strength``).

    Needs the slate's ``clicks``, ``shown`` and ``bids``. Deterministic: ties go to
    the earlier candidate (a stable sort), so a given state always shows one list.
    """

    name = "popularity"
    deterministic = True

    def __init__(self, prior_ctr: float, strength: float) -> None:
        self.prior_ctr, self.strength = prior_ctr, strength

    def _rank(self, slate: Slate, k: int) -> Ranked:
        clicks, shown, bids = slate.need("clicks", "shown", "bids")
        scores = popularity_scores(clicks, shown, bids, self.prior_ctr, self.strength)
        order = np.argsort(-scores, kind="stable")
        return fixed_rank(order, scores[order], k)


class UniformPolicy(Policy):
    """k distinct candidates uniformly at random: every candidate at every slot with probability 1/C."""

    name = "uniform"
    uniform = True

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def _rank(self, slate: Slate, k: int) -> Ranked:
        return uniform_rank(slate.size, k, self.rng)


def describe(params: ThompsonParams) -> dict[str, Any]:
    """What ``/model`` shows of the exploration."""
    return {"draws": params.draws, "scale": params.scale, "calibration_strength": params.calibration_strength,
            "shortlist": params.shortlist,
            "propensity_se_max": round(0.5 / np.sqrt(params.draws), 4)}
