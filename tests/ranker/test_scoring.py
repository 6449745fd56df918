"""Unit tests for scoring, Thompson sampling and propensities (``ranker.scoring``)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from privads.ranker.scoring import (
    AdEvidence,
    calibrated_ctr,
    expected_value,
    fixed_rank,
    popularity_scores,
    position_frequencies,
    sample_users,
    thompson_rank,
    top_k,
    uniform_rank,
    user_factors,
)

LN3 = math.log(3.0)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- top_k -------------------------------------------------------------------------


def test_top_k_order_best_first():
    s = np.array([[0.1, 0.9, 0.5, 0.7],
                  [4.0, -1.0, 3.0, 2.0]])
    np.testing.assert_array_equal(top_k(s, 2), [[1, 3], [0, 2]])
    np.testing.assert_array_equal(top_k(s, 4), [[1, 3, 2, 0], [0, 2, 3, 1]])
    np.testing.assert_array_equal(top_k(s, 1), [[1], [0]])


def test_top_k_truncates_when_k_exceeds_candidates():
    s = np.array([[0.3, 0.1, 0.2]])
    out = top_k(s, 10)
    assert out.shape == (1, 3)
    np.testing.assert_array_equal(out, [[0, 2, 1]])


def test_top_k_ties_return_distinct_indices_with_non_increasing_scores():
    # tie order is unspecified, but the selected scores must be the k largest and the indices distinct
    s = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    for k in range(1, 7):
        out = top_k(s, k)[0]
        assert len(set(out.tolist())) == k
        got = s[0, out]
        assert np.all(np.diff(got) <= 0)
        np.testing.assert_array_equal(got, np.sort(s[0])[::-1][:k])
    assert set(top_k(s, 3)[0].tolist()) == {1, 2, 4}
    assert set(top_k(s, 4)[0].tolist()) == {1, 2, 3, 4} and top_k(s, 4)[0, 3] == 3


def test_top_k_matches_full_argsort_on_random_scores():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((50, 40))
    for k in (1, 5, 17, 40):
        np.testing.assert_array_equal(top_k(s, k), np.argsort(-s, axis=1)[:, :k])


# --- expected_value -------------------------------------------------------------------


def test_expected_value_hand_computed():
    # users u1 = (ln 3, 0), u2 = (0, −ln 3); ads e1 = (1, 0), e2 = (0, 1); bids (2, 4); bias 0
    # u1: σ(ln 3)·2 = 0.75·2 = 1.5;  σ(0)·4 = 0.5·4 = 2.0
    # u2: σ(0)·2 = 1.0;              σ(−ln 3)·4 = 0.25·4 = 1.0
    users = np.array([[LN3, 0.0], [0.0, -LN3]])
    ads = np.array([[1.0, 0.0], [0.0, 1.0]])
    bids = np.array([2.0, 4.0])
    np.testing.assert_allclose(expected_value(users, ads, bids, 0.0), [[1.5, 2.0], [1.0, 1.0]], atol=1e-12)
    # with bias ln 3 and the zero user: both pCTRs are 0.75 → (1.5, 3.0)
    np.testing.assert_allclose(expected_value(np.zeros((1, 2)), ads, bids, LN3), [[1.5, 3.0]], atol=1e-12)


# --- sample_users ----------------------------------------------------------------------


def test_sample_users_scale_zero_returns_mean():
    mean = np.array([0.5, -1.25, 3.0], np.float32)
    prec = np.array([1.0, 4.0, 16.0], np.float32)
    out = sample_users(mean, prec, 7, 0.0, np.random.default_rng(0))
    assert out.shape == (7, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.broadcast_to(mean, (7, 3)))


def test_sample_users_seeded_runs_agree_and_seeds_differ():
    mean = np.zeros(4, np.float32)
    prec = np.full(4, 2.0, np.float32)
    a = sample_users(mean, prec, 10, 1.0, np.random.default_rng(42))
    b = sample_users(mean, prec, 10, 1.0, np.random.default_rng(42))
    c = sample_users(mean, prec, 10, 1.0, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_users_moments():
    # N(mean, scale²/precision): scale 2, precision (1, 4, 16) → variance (4, 1, 0.25)
    # n = 200 000 draws: relative SE of a sample variance is sqrt(2/n) ≈ 0.0032 → rtol 0.02 (> 6 SE);
    # SE of the sample mean is sqrt(var/n) ≤ 0.0045 → atol 0.03 (> 6 SE)
    n = 200_000
    mean = np.array([1.0, -2.0, 0.5], np.float32)
    prec = np.array([1.0, 4.0, 16.0], np.float32)
    x = sample_users(mean, prec, n, 2.0, np.random.default_rng(7)).astype(np.float64)
    np.testing.assert_allclose(x.var(axis=0, ddof=1), [4.0, 1.0, 0.25], rtol=0.02)
    np.testing.assert_allclose(x.mean(axis=0), mean, atol=0.03)


# --- thompson_rank ---------------------------------------------------------------------


def test_thompson_scale_zero_is_exact_ev_ranking():
    rng = np.random.default_rng(5)
    d, c, k = 8, 30, 6
    mean = rng.standard_normal(d).astype(np.float32)
    prec = np.full(d, 16.0, np.float32)
    ads = _unit_rows(rng, c, d)
    bids = rng.uniform(0.1, 2.0, c).astype(np.float32)
    bias = -2.9
    ev = bids / (1.0 + np.exp(-(ads.astype(np.float64) @ mean + bias)))  # σ(m·p + b)·bid, by hand
    want = np.argsort(-ev)[:k]
    r = thompson_rank(mean, prec, ads, bids, k, bias=bias, draws=32, scale=0.0, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(r.index, want)
    np.testing.assert_allclose(r.score, ev[want], rtol=1e-5)
    np.testing.assert_array_equal(r.propensity, np.ones(k))


def test_thompson_truncates_k_to_candidates():
    rng = np.random.default_rng(0)
    ads = _unit_rows(rng, 3, 4)
    r = thompson_rank(np.zeros(4, np.float32), np.ones(4, np.float32), ads, np.ones(3, np.float32), 10,
                      bias=0.0, draws=8, scale=1.0, rng=rng)
    assert sorted(r.index.tolist()) == [0, 1, 2]
    assert r.score.shape == (3,) and r.propensity.shape == (3,)


def test_thompson_propensities_in_range_and_multiples_of_one_over_draws():
    # the served draw is one of S → every propensity ≥ 1/S; each is (count of draws)/S ≤ 1
    rng = np.random.default_rng(11)
    d, c, k, draws = 4, 12, 5, 16
    ads = _unit_rows(rng, c, d)
    bids = rng.uniform(0.5, 1.5, c).astype(np.float32)
    seen_below_one = False
    for _ in range(300):
        mean = rng.standard_normal(d).astype(np.float32) * 0.3
        prec = rng.uniform(0.5, 4.0, d).astype(np.float32)
        r = thompson_rank(mean, prec, ads, bids, k, bias=0.0, draws=draws, scale=1.0, rng=rng)
        assert len(set(r.index.tolist())) == k
        assert np.all(r.propensity >= 1.0 / draws - 1e-12) and np.all(r.propensity <= 1.0)
        np.testing.assert_allclose(r.propensity * draws, np.round(r.propensity * draws), atol=1e-9)
        seen_below_one |= bool(np.any(r.propensity < 1.0))
    assert seen_below_one  # exploration actually happens at scale 1


def test_thompson_position0_frequency_matches_analytic_probability_and_logged_propensity():
    # Two ads e1 = (1, 0), e2 = (0, 1) with equal bids: e1 is ranked first iff u0 > u1.
    # u ~ N(m, s²·diag(1/q)) → u0 − u1 ~ N(m0 − m1, s²(1/q0 + 1/q1)).
    # m = (0.3, 0), q = (2, 8), s = 0.5: var = 0.25·(0.5 + 0.125) = 0.15625, sd = 0.3953,
    # π = Φ(0.3 / 0.3953) = Φ(0.759) ≈ 0.776.
    #
    # Over N requests, the frequency f of e1 at position 0 has SE sqrt(π(1 − π)/N) ≈ 0.0066 at N = 4000.
    # The logged propensity of e1 (when served at 0) is (1 + Binomial(S − 1, π))/S, whose mean is
    # π + (1 − π)/S: a bias ≤ 1/S = 0.0156 at S = 64; its average over ≈ πN requests has SE
    # sqrt(π(1 − π)/S)/sqrt(πN) ≈ 0.001. Tolerances: 4 SE for f vs π (0.027), and
    # 4 SE(f) + 4 SE(mean) + 1/S ≈ 0.047 for f vs mean logged propensity. A wrong propensity (e.g.
    # always 1, or ignoring the posterior scale) is off by > 0.2 here.
    m = np.array([0.3, 0.0], np.float32)
    q = np.array([2.0, 8.0], np.float32)
    s, draws, n = 0.5, 64, 4000
    ads = np.eye(2, dtype=np.float32)
    bids = np.ones(2, np.float32)
    pi = NormalDist().cdf(0.3 / math.sqrt(s * s * (1 / 2 + 1 / 8)))
    rng = np.random.default_rng(2024)
    first = np.empty(n, dtype=np.int64)
    prop0 = np.empty(n)
    for i in range(n):
        r = thompson_rank(m, q, ads, bids, 2, bias=0.0, draws=draws, scale=s, rng=rng)
        first[i], prop0[i] = r.index[0], r.propensity[0]
        assert r.propensity[0] == r.propensity[1]  # with two ads the whole list is decided by position 0
    se_f = math.sqrt(pi * (1 - pi) / n)
    for ad, p_ad in ((0, pi), (1, 1 - pi)):
        served = first == ad
        f = served.mean()
        assert abs(f - p_ad) < 4 * se_f
        se_mean = math.sqrt(p_ad * (1 - p_ad) / draws) / math.sqrt(served.sum())
        assert abs(prop0[served].mean() - f) < 4 * se_f + 4 * se_mean + 1.0 / draws


def test_thompson_position0_frequency_matches_mean_logged_propensity_many_ads():
    # Same check without a closed form: 5 ads, the share of requests serving ad a at position 0
    # versus the mean logged propensity of a when it is served there (tolerance as above,
    # with p(1 − p) ≤ 1/4: 4·0.5/sqrt(N) + 4 SE(mean) + 1/S).
    rng = np.random.default_rng(99)
    d, c, draws, n = 3, 5, 64, 4000
    ads = _unit_rows(rng, c, d)
    bids = rng.uniform(0.8, 1.2, c).astype(np.float32)
    mean = np.array([0.2, -0.1, 0.1], np.float32)
    prec = np.array([3.0, 2.0, 5.0], np.float32)
    first = np.empty(n, dtype=np.int64)
    prop0 = np.empty(n)
    for i in range(n):
        r = thompson_rank(mean, prec, ads, bids, 3, bias=-1.0, draws=draws, scale=1.0, rng=rng)
        first[i], prop0[i] = r.index[0], r.propensity[0]
    assert len(np.unique(first)) >= 2  # the test is only meaningful if exploration happens
    for ad in np.unique(first):
        served = first == ad
        f = served.mean()
        if served.sum() < 50:
            continue
        se_mean = 0.5 / math.sqrt(draws) / math.sqrt(served.sum())
        assert abs(prop0[served].mean() - f) < 4 * 0.5 / math.sqrt(n) + 4 * se_mean + 1.0 / draws


# --- uniform_rank -----------------------------------------------------------------------


def test_uniform_rank_distinct_and_propensity():
    rng = np.random.default_rng(0)
    for _ in range(100):
        r = uniform_rank(10, 4, rng)
        assert r.index.shape == (4,) and len(set(r.index.tolist())) == 4
        assert np.all((r.index >= 0) & (r.index < 10))
        np.testing.assert_array_equal(r.propensity, np.full(4, 0.1))
        np.testing.assert_array_equal(r.score, np.zeros(4))


def test_uniform_rank_k_larger_than_n():
    r = uniform_rank(3, 5, np.random.default_rng(1))
    assert sorted(r.index.tolist()) == [0, 1, 2]
    np.testing.assert_allclose(r.propensity, np.full(3, 1 / 3))


def test_uniform_rank_position_frequencies_are_one_over_n():
    # each ad is at position 0 with probability 1/n = 0.2; 10 000 draws → SE sqrt(0.16/10000) = 0.004,
    # tolerance 5 SE = 0.02
    rng = np.random.default_rng(3)
    firsts = np.array([uniform_rank(5, 2, rng).index[0] for _ in range(10_000)])
    freq = np.bincount(firsts, minlength=5) / firsts.size
    np.testing.assert_allclose(freq, np.full(5, 0.2), atol=0.02)


@pytest.mark.parametrize("n", [1, 7])
def test_uniform_rank_seeded_is_deterministic(n):
    a = uniform_rank(n, 3, np.random.default_rng(5)).index
    b = uniform_rank(n, 3, np.random.default_rng(5)).index
    np.testing.assert_array_equal(a, b)


# --- propensities over whole lists, with per-ad calibration ---------------------------


def test_position_frequencies_columns_sum_to_one_rows_at_most_one():
    rng = np.random.default_rng(5)
    lists = np.stack([rng.choice(9, size=4, replace=False) for _ in range(200)])
    freq = position_frequencies(lists, 9)
    assert freq.shape == (9, 4)
    np.testing.assert_allclose(freq.sum(axis=0), 1.0)
    assert np.all(freq.sum(axis=1) <= 1.0 + 1e-12)
    np.testing.assert_allclose(freq[lists[0, 2], 2], np.mean(lists[:, 2] == lists[0, 2]))


def _state(seed: int):
    rng = np.random.default_rng(seed)
    d, c = 3, 6
    ads = _unit_rows(rng, c, d)
    bids = rng.uniform(0.8, 1.2, c).astype(np.float32)
    mean = np.array([0.4, -0.2, 0.1], np.float32)
    prec = np.array([4.0, 2.0, 6.0], np.float32)
    # ads 0-2 have little evidence (two never shown, one 3 clicks where 2 were expected), ads 3-5 much
    evidence = AdEvidence(clicks=np.array([0, 3, 0, 9, 30, 2]), expected=np.array([0.0, 2.0, 0.0, 15.0, 20.0, 25.0]),
                          strength=5.0)
    return ads, bids, mean, prec, evidence


def test_logged_propensities_match_served_frequencies_at_every_position_with_calibration():
    # One fixed request state, served N times. For every (ad, position) the share of requests that
    # served the ad there must match (a) a 200k-draw estimate of the policy's true probability, and
    # (b) the mean propensity logged when it was served there. SE of a share ≤ 0.5/sqrt(N) = 0.0079 at
    # N = 4000; the logged propensity carries the served draw, a bias ≤ 1/S. Tolerances are 4 SE (+ 1/S).
    ads, bids, mean, prec, evidence = _state(3)
    k, draws, n = 3, 64, 4000
    rng = np.random.default_rng(17)
    users = sample_users(mean, prec, 200_000, 1.0, rng)
    ctr = calibrated_ctr(1.0 / (1.0 + np.exp(-(users @ ads.T - 2.0))), evidence, rng)
    truth = position_frequencies(top_k(ctr * bids, k), ads.shape[0])
    served = np.zeros((ads.shape[0], k))
    logged = np.zeros((ads.shape[0], k))
    for i in range(n):
        r = thompson_rank(mean, prec, ads, bids, k, bias=-2.0, draws=draws, scale=1.0, rng=rng, evidence=evidence)
        if i < 50:  # each request's propensities come from a matrix whose columns sum to one
            freq = position_frequencies(r.lists, ads.shape[0])
            np.testing.assert_allclose(freq.sum(axis=0), 1.0)
            assert np.all(freq.sum(axis=1) <= 1.0 + 1e-12)
            np.testing.assert_array_equal(r.propensity, freq[r.index, np.arange(k)])
            np.testing.assert_array_equal(r.lists[0], r.index)
        served[r.index, np.arange(k)] += 1
        logged[r.index, np.arange(k)] += r.propensity
    f = served / n
    se = 0.5 / math.sqrt(n)
    assert np.all(np.abs(f - truth) < 4 * se), (f, truth)
    seen = served >= 100
    mean_logged = np.where(seen, logged / np.maximum(served, 1), 0.0)
    assert seen.sum() >= 6  # the check is only meaningful if several (ad, position) pairs are explored
    assert np.all(np.abs(mean_logged - f)[seen] < 4 * se + 4 * 0.5 / math.sqrt(draws * 100) + 1.0 / draws)
    # the true per-position probabilities over all ads sum to one
    np.testing.assert_allclose(truth.sum(axis=0), 1.0)


def test_uncertain_ads_are_explored_even_without_user_uncertainty():
    # scale 0: the user draw is the mean every time; only the calibration draws randomise the list
    ads, bids, mean, prec, evidence = _state(4)
    rng = np.random.default_rng(1)
    fixed = thompson_rank(mean, prec, ads, bids, 3, bias=-2.0, draws=32, scale=0.0, rng=rng)
    np.testing.assert_array_equal(fixed.propensity, 1.0)
    tops = {tuple(thompson_rank(mean, prec, ads, bids, 3, bias=-2.0, draws=32, scale=0.0, rng=rng,
                                evidence=evidence).index.tolist()) for _ in range(200)}
    assert len(tops) > 1
    assert any(set(t) - set(fixed.index.tolist()) for t in tops)


def test_calibrated_ctr_is_the_gamma_posterior_of_clicks_over_expected():
    # r ~ Gamma(a + c, a + e): mean (a + c)/(a + e), variance (a + c)/(a + e)²; θ = min(1, p·r)
    rng = np.random.default_rng(8)
    p = np.full((200_000, 3), 0.1)
    ev = AdEvidence(clicks=np.array([0, 6, 50]), expected=np.array([0.0, 30.0, 10.0]), strength=5.0)
    out = calibrated_ctr(p, ev, rng)
    np.testing.assert_allclose(out[:, 0].mean(), 0.1, rtol=0.01)  # no evidence: the model, on average
    np.testing.assert_allclose(out[:, 0].var(), 0.01 * 5 / 25, rtol=0.03)
    np.testing.assert_allclose(out[:, 1].mean(), 0.1 * 11 / 35, rtol=0.01)  # over-rated by the model: sinks
    np.testing.assert_allclose(np.minimum(1, 0.1 * rng.gamma(55, 1 / 15, 200_000)).mean(), out[:, 2].mean(),
                               rtol=0.01)  # under-rated: rises, capped at 1
    assert np.all((out > 0) & (out <= 1))
    np.testing.assert_array_equal(p, 0.1)  # the input is not modified
    np.testing.assert_allclose(ev.mean(), [1.0, 11 / 35, 55 / 15])
    np.testing.assert_allclose(ev.upper(2.0), ev.mean() + 2 * np.sqrt([5, 11, 55]) / np.array([5, 35, 15]))


def test_user_factors_are_the_gamma_poisson_posterior_mean_of_the_users_own_counts():
    # ψ ~ Gamma(b, b), c ~ Poisson(ψ e): the posterior mean (b + c) / (b + e)
    clicks, expected = np.array([0.0, 0.0, 3.0, 1.0]), np.array([0.0, 8.0, 1.0, 1.0])
    np.testing.assert_allclose(user_factors(clicks, expected, 2.0), [1.0, 2 / 10, 5 / 3, 1.0])
    np.testing.assert_array_equal(user_factors(clicks, expected, 0.0), np.ones(4))  # off


def test_scaled_evidence_is_the_users_factor_times_the_ads():
    # ψ · Gamma(α, β) is Gamma(α, β / ψ): mean, upper bound and draws all scale by ψ
    ev = AdEvidence(clicks=np.array([0, 6, 50]), expected=np.array([0.0, 30.0, 10.0]), strength=5.0,
                    prior=np.array([1.0, 0.5, 2.0]))
    psi = np.array([0.2, 1.0, 3.0])
    scaled = ev.scaled(psi)
    np.testing.assert_allclose(scaled.mean(), psi * ev.mean())
    np.testing.assert_allclose(scaled.upper(2.0), psi * ev.upper(2.0))
    draws = scaled.sample(200_000, np.random.default_rng(3))
    ref = ev.sample(200_000, np.random.default_rng(4))
    np.testing.assert_allclose(draws.mean(axis=0), psi * ref.mean(axis=0), rtol=0.01)
    np.testing.assert_allclose(draws.std(axis=0), psi * ref.std(axis=0), rtol=0.02)
    np.testing.assert_allclose(AdEvidence(np.zeros(2), np.zeros(2)).scaled(np.array([0.5, 2.0])).mean(), [0.5, 2.0])


def test_popularity_scores_and_fixed_rank():
    # Beta(0.05·20 + c, 0.95·20 + n − c) mean × bid: (1 + 5)/(20 + 50) × 2, 1/20 × 1, (1 + 0)/(20 + 10) × 3
    s = popularity_scores(np.array([5, 0, 0]), np.array([50, 0, 10]), np.array([2.0, 1.0, 3.0]), 0.05, 20.0)
    np.testing.assert_allclose(s, [6 / 70 * 2, 0.05, 3 / 30])
    r = fixed_rank(np.array([2, 0, 1]), np.array([0.3, 0.2, 0.1]), 2)
    np.testing.assert_array_equal(r.index, [2, 0])
    np.testing.assert_array_equal(r.propensity, [1.0, 1.0])
