"""Scoring, Thompson sampling and propensities: the pure maths (numpy only).

The served list is the top-k of one posterior draw. A draw samples the user
vector from its Gaussian posterior and each candidate's *calibration factor*
(``AdEvidence``): how the ad's clicks in this arm compare with the clicks the
served model expected of it, a Gamma posterior around 1. The drawn click rate
is the model's pCTR for the drawn user times the drawn factor, so an ad that
the model over-rates (it is shown and not clicked) sinks within seconds, long
before its impressions' negatives are labelled, and a new ad is explored in
proportion to its uncertainty, while the user's own taste still orders the
ads. Propensities are estimated by Monte-Carlo: ``S`` joint draws, including
the served one, each ranking the same candidate set; the propensity of the ad
shown at position ``j`` is the share of draws that put that ad at ``j`` — one
column of a per-request matrix whose columns each sum to 1
(``position_frequencies``). Because the served draw is one of the ``S``, every
logged propensity is ≥ 1/S (no zero to divide by), its expectation is
``π + (1 − π)/S`` (an upward bias ≤ 1/S), and its standard error is
``sqrt(π(1 − π)/S)`` (≤ 0.0625 at S = 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privads.ranker.updates import ad_posterior, sigmoid

MIN_FACTOR = 1e-3  # a category factor is never taken below this (a prior of rate a / 0 is no prior)


def category_factors(clicks: np.ndarray, expected: np.ndarray, groups: np.ndarray, n_groups: int,
                     strength: float) -> np.ndarray:
    """Each category's pooled calibration factor: ``(a₀ + Σ clicks) / (a₀ + Σ expected)`` over its ads.

    The posterior mean of a category-level factor ``ρ ~ Gamma(a₀, a₀)`` from all its
    ads' clicks and the clicks the served model predicted for them: the prior mean
    of each of its ads' own factors (``AdEvidence.prior``). ``groups`` are exact
    categories (``ServingCatalog.group_ids``), not the ranker's hashed buckets, which
    collide.

    Parameters
    ----------
    clicks, expected : ndarray, shape (N,)
        Per catalog row, in one arm.
    groups : ndarray of int, shape (N,)
        Each row's category id, in [0, n_groups).
    n_groups : int
    strength : float
        ``a₀``, the category prior's weight in clicks.

    Returns
    -------
    ndarray, shape (n_groups,)
    """
    c = np.bincount(groups, weights=np.asarray(clicks, np.float64), minlength=n_groups)
    e = np.bincount(groups, weights=np.asarray(expected, np.float64), minlength=n_groups)
    return (strength + c) / (strength + e)


@dataclass(frozen=True, slots=True)
class AdEvidence:
    """Per-ad calibration of the served model from the ad's own clicks.

    If the model's predictions for an ad are off by a factor ``r`` (the ad is
    better or worse than its text and the user vectors say), its clicks are
    ``c ~ Poisson(r · e)`` where ``e`` is the sum of the pCTRs the model
    predicted for its impressions. With the prior ``r ~ Gamma(a, a)`` (mean 1,
    worth ``a`` clicks) the posterior is ``Gamma(a + c, a + e)``: conjugate,
    current as soon as an impression is served (``e`` grows) or clicked (``c``
    grows), with no wait for the attribution window to label negatives.

    The prior's mean need not be 1: with ``prior`` (each ad's category factor,
    ``category_factors``) it is ``Gamma(a, a / prior)``, mean ``prior``, so that
    evidence is shared. An ad whose category the model over-rates starts from
    that category's factor instead of waiting for hundreds of its own unclicked
    impressions.

    Attributes
    ----------
    clicks, expected : ndarray, shape (C,)
        The ad's clicks in this arm, and the clicks its impressions were predicted
        to get (``Σ pCTR``), aligned with the candidates.
    strength : float
        ``a``, the prior's weight in clicks.
    prior : ndarray, shape (C,), optional
        The prior mean of each ad's factor (None: 1 for every ad).
    """

    clicks: np.ndarray
    expected: np.ndarray
    strength: float = 5.0
    prior: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> AdEvidence:
        return AdEvidence(self.clicks[keep], self.expected[keep], self.strength,
                          None if self.prior is None else self.prior[keep])

    def scaled(self, user: np.ndarray) -> AdEvidence:
        """The factors times the user's own ``user`` (``user_factors``, shape (C,)): ψ · Gamma(α, β).

        ``ψ · Gamma(α, β) = Gamma(α, β / ψ)``: the prior mean and the expected clicks are
        divided through by ψ, so that mean, upper bound and draws all scale by ψ.
        """
        user = np.asarray(user, np.float64)
        prior = user if self.prior is None else self.prior * user
        return AdEvidence(self.clicks, self.expected / user, self.strength, prior)

    def shape_rate(self) -> tuple[np.ndarray, np.ndarray]:
        """The Gamma posterior's shape and rate, shape (C,) each."""
        rate = self.strength if self.prior is None else self.strength / np.maximum(self.prior, MIN_FACTOR)
        return self.strength + self.clicks.astype(np.float64), rate + self.expected.astype(np.float64)

    def mean(self) -> np.ndarray:
        """Posterior mean of each ad's factor, shape (C,)."""
        shape, rate = self.shape_rate()
        return shape / rate

    def upper(self, z: float) -> np.ndarray:
        """Posterior mean plus ``z`` standard deviations, shape (C,)."""
        shape, rate = self.shape_rate()
        return (shape + z * np.sqrt(shape)) / rate

    def sample(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        """Factors drawn from the posteriors, shape (draws, C)."""
        shape, rate = self.shape_rate()
        return rng.standard_gamma(shape, size=(draws, shape.shape[0])) / rate


def user_factors(clicks: np.ndarray, expected: np.ndarray, strength: float) -> np.ndarray:
    """The user's own factor on each candidate's category: ``ψ = (b + c) / (b + e)``.

    A user × category random effect on the calibration factor. With ``ψ ~ Gamma(b, b)``
    (mean 1, worth ``b`` clicks) and the user's clicks ``c ~ Poisson(ψ · e)`` on the
    category's ads, ``e`` the clicks the population-level model expected of those
    impressions (pCTR × the ad's factor, without ψ), the posterior mean is the
    ratio above. An ad's category pooled over every user says how the category
    does on average; ψ says how this user differs: a category shown to the user
    and never clicked sinks for them alone, one they click rises for them alone,
    and a category they were never shown stays at the population's.

    Parameters
    ----------
    clicks, expected : ndarray, shape (C,)
        The user's counts in each candidate's category (``infra.keys.taste_counts``).
    strength : float
        ``b``, in clicks; 0 turns ψ off (1 everywhere).

    Returns
    -------
    ndarray, shape (C,)
    """
    if strength <= 0:
        return np.ones(np.shape(clicks))
    return (strength + np.asarray(clicks, np.float64)) / (strength + np.asarray(expected, np.float64))


def pooled_factors(clicks: np.ndarray, expected: np.ndarray, groups: np.ndarray, n_groups: int,
                   category_strength: float, calibration_strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Each category's pooled factor and each ad's factor under it: ``category_factors``, then ``AdEvidence.mean``.

    Parameters
    ----------
    clicks, expected : ndarray, shape (N,)
    groups : ndarray of int, shape (N,)
        Each ad's category id, in [0, n_groups).
    n_groups : int
    category_strength, calibration_strength : float
        The category prior's and each ad's prior weight, in clicks.

    Returns
    -------
    factors : ndarray, shape (n_groups,)
    means : ndarray, shape (N,)
    """
    factors = category_factors(clicks, expected, groups, n_groups, category_strength)
    return factors, AdEvidence(clicks, expected, calibration_strength, factors[groups]).mean()


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
    lists : ndarray, shape (S, k), optional
        The Monte-Carlo lists the propensities were counted from (row 0 is served).
    pctr : ndarray, shape (k,), optional
        The model's pCTR of each shown ad at the user's posterior mean, before
        calibration: what the ad's ``AdEvidence.expected`` accumulates.
    factor : ndarray, shape (k,), optional
        Each shown ad's calibration factor as the policy held it (posterior
        mean): logged with the impression, it offsets the user's learning step
        (``ranker.updates.learn_events``).
    parts : ScoreParts, optional
        What each shown ad's ``score`` is made of, under the served draw (Thompson policies).
    user_factor : ndarray, shape (k,), optional
        The user's own factor on each shown ad's category (``user_factors``), which
        ``factor`` includes: logged so that the stream can count the impression's
        expected clicks without it.
    """

    index: np.ndarray
    score: np.ndarray
    propensity: np.ndarray
    lists: np.ndarray | None = None
    pctr: np.ndarray | None = None
    factor: np.ndarray | None = None
    parts: ScoreParts | None = None
    user_factor: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class ScoreParts:
    """The parts of a Thompson policy's served scores, per shown ad (shape (k,) each).

    ``score = min(σ(dot_scale · user_dot + logit) · factor, 1) · bid`` (``combine``), with
    ``user_dot`` the served draw of the user's vector against the ad's, ``logit`` the
    ranker's ``h(x)`` (the global bias without a ranker) and ``factor`` the drawn
    calibration factor (1 without evidence).
    """

    user_dot: np.ndarray
    logit: np.ndarray
    dot_scale: float
    factor: np.ndarray
    bid: np.ndarray

    def combine(self) -> np.ndarray:
        """The scores these parts make, shape (k,)."""
        return np.minimum(sigmoid(self.dot_scale * self.user_dot + self.logit) * self.factor, 1.0) * self.bid

    def take(self, rows: np.ndarray) -> ScoreParts:
        return ScoreParts(self.user_dot[rows], self.logit[rows], self.dot_scale, self.factor[rows], self.bid[rows])


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
    noise *= (scale / np.sqrt(precision)).astype(np.float32)
    noise += mean.astype(np.float32, copy=False)
    return noise


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


def retrieval_keys(ads: np.ndarray, bids: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
    """Index keys that make inner-product search approximate expected-value search.

    At ad click-through rates ``σ(z) ≈ e^z``, so ``log EV ≈ u·p + b + log(bid · r)``
    with ``r`` the ad's calibration factor: the key ``[p, log(bid · r)]`` against the
    query ``[u, 1]`` orders ads by that. With ``r`` the factor's posterior mean
    (``AdEvidence.mean``), an ad shown and not clicked, or of a category that is
    not, leaves the retrieved set and makes room for the next one: retrieval walks
    down the catalog instead of returning the same highest bids forever.

    Parameters
    ----------
    ads : ndarray, shape (n, D)
    bids : ndarray, shape (n,)
    factors : ndarray, shape (n,), optional
        ``r`` of each ad (None: 1).

    Returns
    -------
    ndarray, shape (n, D + 1), float32
    """
    value = bids if factors is None else np.asarray(bids, np.float64) * factors
    log_value = np.log(np.maximum(value, MIN_BID)).astype(np.float32)
    return np.hstack([ads.astype(np.float32, copy=False), log_value[:, None]])


def retrieval_query(user: np.ndarray, bid_weight: float = 1.0) -> np.ndarray:
    """Query for ``retrieval_keys``: ``[u, bid_weight]``, shape (D + 1,); weight 0 is plain similarity."""
    return np.append(user.astype(np.float32, copy=False), np.float32(bid_weight))


SMALL_SORT = 128


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
    if scores.shape[1] <= SMALL_SORT:  # a full sort of short rows costs less than partition + sort + gathers
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def calibrated_ctr(ctr: np.ndarray, evidence: AdEvidence, rng: np.random.Generator) -> np.ndarray:
    """The model's click rates times drawn calibration factors, capped at 1.

    Parameters
    ----------
    ctr : ndarray, shape (S, C)
        The model's pCTR per draw and candidate.
    evidence : AdEvidence
    rng : numpy Generator

    Returns
    -------
    ndarray, shape (S, C)
    """
    return np.minimum(ctr * evidence.sample(ctr.shape[0], rng), 1.0)


def optimistic_value(mean: np.ndarray, precision: np.ndarray, ads: np.ndarray, bids: np.ndarray,
                     bias: float | np.ndarray, *, dot_scale: float, scale: float, evidence: AdEvidence | None,
                     z: float = 2.0) -> np.ndarray:
    """An upper confidence bound of each candidate's expected value, for shortlisting.

    The logit's user term is taken ``z`` posterior standard deviations above its
    mean (``u·p ~ N(μ·p, scale² Σ p²/q)``), and the ad's calibration factor ``z``
    standard deviations above its posterior mean.

    Parameters
    ----------
    mean, precision : ndarray, shape (D,)
    ads : ndarray, shape (C, D)
    bids : ndarray, shape (C,)
    bias : float or ndarray, shape (C,)
    dot_scale, scale : float
    evidence : AdEvidence or None
    z : float

    Returns
    -------
    ndarray, shape (C,)
    """
    sd = scale * np.sqrt((ads * ads) @ (1.0 / precision))
    ctr = sigmoid(dot_scale * (ads @ mean + z * sd) + bias)
    if evidence is not None:
        ctr = np.minimum(ctr * evidence.upper(z), 1.0)
    return ctr * bids


def position_frequencies(lists: np.ndarray, n_candidates: int) -> np.ndarray:
    """Share of draws that put each candidate at each position.

    Parameters
    ----------
    lists : ndarray of int, shape (S, k)
        One ranked list per draw (distinct candidates per row).
    n_candidates : int

    Returns
    -------
    ndarray, shape (n_candidates, k)
        Entry ``[a, j]`` estimates P(ad ``a`` shown at position ``j``). Each column
        sums to 1 and each row to at most 1 (an ad appears at most once per list).
    """
    s, k = lists.shape
    freq = np.zeros((n_candidates, k))
    np.add.at(freq, (lists, np.broadcast_to(np.arange(k), (s, k))), 1.0 / s)
    return freq


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
    evidence: AdEvidence | None = None,
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
    evidence : AdEvidence, optional
        Per-ad calibration; every draw samples each candidate's factor.

    Returns
    -------
    Ranked
    """
    users = sample_users(mean, precision, draws, scale, rng)
    dots = users @ ads.T
    ctr = sigmoid(dot_scale * dots + bias)
    factors = None
    if evidence is not None:  # as calibrated_ctr, keeping the factors drawn
        factors = evidence.sample(ctr.shape[0], rng)
        ctr = np.minimum(ctr * factors, 1.0)
    ev = ctr * bids[None, :]
    lists = top_k(ev, k)
    served = lists[0]
    propensity = (lists == served[None, :]).mean(axis=0)
    logit = np.broadcast_to(np.asarray(bias, dtype=np.float64), (ads.shape[0],))[served]
    parts = ScoreParts(dots[0, served], logit, dot_scale,
                       np.ones(served.shape[0]) if factors is None else factors[0, served], bids[served])
    return Ranked(index=served, score=ev[0, served], propensity=propensity, lists=lists, parts=parts)


def popularity_scores(clicks: np.ndarray, impressions: np.ndarray, bids: np.ndarray, prior_ctr: float,
                      strength: float) -> np.ndarray:
    """Non-personalised expected value: the Beta posterior-mean CTR times the bid.

    Parameters
    ----------
    clicks, impressions : ndarray, shape (n,)
    bids : ndarray, shape (n,)
    prior_ctr : float
        Prior mean CTR, worth ``strength`` impressions.
    strength : float

    Returns
    -------
    ndarray, shape (n,)
    """
    alpha, beta = ad_posterior(clicks, np.maximum(impressions, clicks), prior_ctr, strength)
    return alpha / (alpha + beta) * bids


def fixed_rank(order: np.ndarray, scores: np.ndarray, k: int) -> Ranked:
    """The first ``k`` of a deterministic order; every shown ad has propensity 1.

    Parameters
    ----------
    order : ndarray of int, shape (n,)
        Candidate positions, best first.
    scores : ndarray, shape (n,)
        Their scores, aligned with ``order``.
    """
    k = min(k, order.shape[0])
    return Ranked(index=order[:k], score=scores[:k], propensity=np.ones(k))


def uniform_rank(n: int, k: int, rng: np.random.Generator) -> Ranked:
    """A uniformly random list of ``k`` of ``n`` ads; each position has propensity 1/n."""
    k = min(k, n)
    index = rng.choice(n, size=k, replace=False)
    return Ranked(index=index, score=np.zeros(k), propensity=np.full(k, 1.0 / n))
