"""Unit tests for the online user update maths (``ranker.updates``).

Every expected number below is derived by hand in the comments; the bias
``ln 3`` is used because ``σ(ln 3) = 3 / (3 + 1) = 0.75`` exactly.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from privads.ranker.updates import (
    CLICK,
    IMPRESSION,
    UpdateParams,
    learn_events,
    logit,
    population_prior,
    sigmoid,
    update_many,
    update_user,
)

LN3 = math.log(3.0)
P = np.array([0.6, 0.8], dtype=np.float32)  # unit norm: 0.36 + 0.64 = 1


def _params(lr: float = 1.0, max_step: float = 100.0, l2: float = 0.0, bias: float = 0.0) -> UpdateParams:
    return UpdateParams(learning_rate=lr, max_step=max_step, l2_prior=l2, bias=bias)


def _one(mean, precision, p, y, prior, params):
    return update_user(np.asarray(mean, np.float32), np.asarray(precision, np.float32),
                       np.asarray([p], np.float32), np.asarray([y]), np.asarray(prior, np.float32), params)


# --- sigmoid / logit -----------------------------------------------------------


def test_sigmoid_known_values():
    # σ(0) = 1/2, σ(ln 3) = 3/4, σ(−ln 3) = 1/4, σ(2) = 1/(1 + e^−2) = 0.8807970779778823
    assert float(sigmoid(0.0)) == pytest.approx(0.5, abs=1e-15)
    assert float(sigmoid(LN3)) == pytest.approx(0.75, abs=1e-12)
    assert float(sigmoid(-LN3)) == pytest.approx(0.25, abs=1e-12)
    assert float(sigmoid(2.0)) == pytest.approx(1.0 / (1.0 + math.exp(-2.0)), rel=1e-12)


def test_sigmoid_vectorised_and_stable_at_extremes():
    # guards: elementwise on arrays, no overflow warning and saturates to exactly 0 / 1
    z = np.array([-1000.0, -LN3, 0.0, LN3, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = sigmoid(z)
    assert s.shape == (5,)
    np.testing.assert_allclose(s, [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-12)
    assert np.all(np.isfinite(s))


def test_sigmoid_symmetry():
    # σ(−z) = 1 − σ(z)
    z = np.linspace(-20, 20, 81)
    np.testing.assert_allclose(sigmoid(-z), 1.0 - sigmoid(z), atol=1e-12)


def test_logit_known_values_and_inverse():
    # logit(3/4) = ln 3; logit(1/2) = 0; logit(0.05) = ln(0.05/0.95) = −ln 19
    assert logit(0.75) == pytest.approx(LN3, rel=1e-12)
    assert logit(0.5) == pytest.approx(0.0, abs=1e-15)
    assert logit(0.05) == pytest.approx(-math.log(19.0), rel=1e-12)
    assert isinstance(logit(0.3), float)
    for z in (-7.5, -1.0, 0.25, 3.0):
        assert logit(float(sigmoid(z))) == pytest.approx(z, abs=1e-9)


# --- update_user: hand-computed single steps ---------------------------------------


def test_click_step_hand_computed():
    # m = (0, 0), q = (1, 1), p = (0.6, 0.8), y = 1, b = ln 3, η = 2, λ = 0
    # z = m·p + b = ln 3 → σ = 0.75
    # g = (σ − y)·p = −0.25·(0.6, 0.8) = (−0.15, −0.20); η·g = (−0.3, −0.4), |η·g| = 0.5 < max_step
    # m' = m − η·g = (0.3, 0.4)
    # q' = q + σ(1 − σ)·p² = 1 + 0.1875·(0.36, 0.64) = (1.0675, 1.12)
    m, q = _one([0, 0], [1, 1], P, 1, [0, 0], _params(lr=2.0, bias=LN3))
    np.testing.assert_allclose(m, [0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(q, [1.0675, 1.12], atol=1e-6)


def test_non_click_step_hand_computed():
    # same as above with y = 0: g = (0.75 − 0)·p = (0.45, 0.60); η·g = (0.9, 1.2), |η·g| = 1.5 < 100
    # m' = (−0.9, −1.2); precision increment identical: q' = (1.0675, 1.12)
    m, q = _one([0, 0], [1, 1], P, 0, [0, 0], _params(lr=2.0, bias=LN3))
    np.testing.assert_allclose(m, [-0.9, -1.2], atol=1e-6)
    np.testing.assert_allclose(q, [1.0675, 1.12], atol=1e-6)


def test_clipped_step_hand_computed():
    # m = 0, b = 0 → σ = 0.5; y = 0, η = 4: η·g = 4·0.5·(0.6, 0.8) = (1.2, 1.6), |η·g| = 2.0
    # max_step = 1 → step scaled by 1/2 to (0.6, 0.8): m' = (−0.6, −0.8) (norm exactly 1)
    # q' = 2 + 0.25·(0.36, 0.64) = (2.09, 2.16)
    m, q = _one([0, 0], [2, 2], P, 0, [0, 0], _params(lr=4.0, max_step=1.0))
    np.testing.assert_allclose(m, [-0.6, -0.8], atol=1e-6)
    assert float(np.linalg.norm(m)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(q, [2.09, 2.16], atol=1e-6)


def test_unclipped_when_step_equals_max_step():
    # |η·g| = 0.5 exactly equals max_step = 0.5: not scaled (clip only when norm > max_step)
    # m' = (0.3, 0.4) as in the click example (σ = 0.75, η = 2)
    m, _ = _one([0, 0], [1, 1], P, 1, [0, 0], _params(lr=2.0, max_step=0.5, bias=LN3))
    np.testing.assert_allclose(m, [0.3, 0.4], atol=1e-6)


def test_l2_pull_toward_prior_mean_hand_computed():
    # 3-d: m = (1, 0, 0), μ = (0.2, 0.4, 0), p = (0, 0, 1), y = 1, b = 0, λ = 0.5, η = 1
    # z = m·p = 0 → σ = 0.5
    # g = (σ − y)·p + λ·(m − μ) = (0, 0, −0.5) + 0.5·(0.8, −0.4, 0) = (0.4, −0.2, −0.5)
    # |g| = sqrt(0.16 + 0.04 + 0.25) = 0.67 < 100 → m' = m − g = (0.6, 0.2, 0.5)
    # q' = (1, 1, 1) + 0.25·(0, 0, 1) = (1, 1, 1.25)
    m, q = _one([1, 0, 0], [1, 1, 1], [0, 0, 1], 1, [0.2, 0.4, 0], _params(l2=0.5))
    np.testing.assert_allclose(m, [0.6, 0.2, 0.5], atol=1e-6)
    np.testing.assert_allclose(q, [1.0, 1.0, 1.25], atol=1e-6)
    # the coordinates orthogonal to p moved toward μ (1 → 0.6 toward 0.2; 0 → 0.2 toward 0.4)
    assert abs(m[0] - 0.2) < abs(1 - 0.2) and abs(m[1] - 0.4) < abs(0 - 0.4)


def test_precision_increment_is_sigma_one_minus_sigma_p_squared():
    # for several z = m·p + b, Δq = σ(z)(1 − σ(z))·p² (independent of y), computed with math.exp
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.standard_normal(4)
        p /= np.linalg.norm(p)
        m = rng.standard_normal(4)
        b = float(rng.normal())
        s = 1.0 / (1.0 + math.exp(-(float(m @ p) + b)))
        for y in (0, 1):
            _, q = _one(m, np.full(4, 3.0), p, y, np.zeros(4), _params(bias=b))
            np.testing.assert_allclose(q - 3.0, s * (1 - s) * p * p, atol=2e-6)


# --- update_user: properties ---------------------------------------------------------


def test_inputs_not_modified_and_outputs_are_new_float32():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(5).astype(np.float32)
    prec = np.full(5, 16.0, dtype=np.float32)
    ads = rng.standard_normal((3, 5)).astype(np.float32)
    clicked = np.array([1, 0, 1])
    prior = rng.standard_normal(5).astype(np.float32)
    before = [a.copy() for a in (mean, prec, ads, clicked, prior)]
    m, q = update_user(mean, prec, ads, clicked, prior, _params(lr=0.8, max_step=1.0, l2=0.01, bias=-2.9))
    for a, b in zip((mean, prec, ads, clicked, prior), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert m.dtype == np.float32 and q.dtype == np.float32
    assert not np.shares_memory(m, mean) and not np.shares_memory(q, prec)
    assert not np.allclose(m, mean)  # something did change


def test_no_examples_is_identity():
    mean = np.array([0.1, -0.2], np.float32)
    prec = np.array([4.0, 5.0], np.float32)
    m, q = update_user(mean, prec, np.zeros((0, 2), np.float32), np.zeros(0), np.zeros(2, np.float32), _params())
    np.testing.assert_array_equal(m, mean)
    np.testing.assert_array_equal(q, prec)


def test_batch_equals_sequential_application():
    # applying n examples in one call == applying them one call at a time, in order
    rng = np.random.default_rng(1)
    d, n = 6, 12
    ads = rng.standard_normal((n, d)).astype(np.float32)
    ads /= np.linalg.norm(ads, axis=1, keepdims=True)
    clicked = rng.integers(0, 2, n)
    prior = rng.standard_normal(d).astype(np.float32) * 0.1
    params = _params(lr=0.8, max_step=0.3, l2=0.05, bias=-1.0)
    m0, q0 = rng.standard_normal(d).astype(np.float32), np.full(d, 16.0, np.float32)
    mb, qb = update_user(m0, q0, ads, clicked, prior, params)
    ms, qs = m0, q0
    for i in range(n):
        ms, qs = update_user(ms, qs, ads[i:i + 1], clicked[i:i + 1], prior, params)
    np.testing.assert_allclose(mb, ms, atol=1e-5)
    np.testing.assert_allclose(qb, qs, atol=1e-4)


def test_order_of_examples_matters():
    # (click on e1, then no click on e2) ≠ (no click on e2, then click on e1):
    # order A: m1 = (0.5, 0) after the click on e1 = (1, 0); the second step sees z = 0.3, not 0
    e = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    y = np.array([1, 0])
    args = (np.zeros(2, np.float32), np.ones(2, np.float32))
    ma, qa = update_user(*args, e, y, np.zeros(2, np.float32), _params())
    mb, qb = update_user(*args, e[::-1].copy(), y[::-1].copy(), np.zeros(2, np.float32), _params())
    assert not np.allclose(ma, mb, atol=1e-4)
    assert not np.allclose(qa, qb, atol=1e-4)
    # order A by hand: step 1: m = (0.5, 0), q = (1.25, 1)
    # step 2: z = 0.3, s = σ(0.3); m = (0.5, 0) − s·(0.6, 0.8); q += s(1 − s)·(0.36, 0.64)
    s = 1.0 / (1.0 + math.exp(-0.3))
    np.testing.assert_allclose(ma, [0.5 - 0.6 * s, -0.8 * s], atol=1e-6)
    np.testing.assert_allclose(qa, [1.25 + 0.36 * s * (1 - s), 1 + 0.64 * s * (1 - s)], atol=1e-6)


@pytest.mark.parametrize("max_step", [0.05, 100.0])
def test_click_increases_and_non_click_decreases_score(max_step):
    # with no L2 pull, a click moves m along +p (m·p up) and a non-click along −p (m·p down)
    rng = np.random.default_rng(2)
    for _ in range(25):
        p = rng.standard_normal(8)
        p /= np.linalg.norm(p)
        m = rng.standard_normal(8)
        params = _params(lr=0.8, max_step=max_step, bias=float(rng.normal()))
        m_click, _ = _one(m, np.ones(8), p, 1, np.zeros(8), params)
        m_skip, _ = _one(m, np.ones(8), p, 0, np.zeros(8), params)
        base = float(np.float32(m) @ np.float32(p))
        assert float(m_click @ np.float32(p)) > base
        assert float(m_skip @ np.float32(p)) < base


# Beta posterior per ad: prior Beta(0.05·20, 0.95·20) = Beta(1, 19); 3 clicks in 10 → Beta(4, 26)
def test_ad_posterior_hand_computed():
    from privads.ranker.updates import ad_posterior

    a, b = ad_posterior(np.array([0, 3]), np.array([0, 10]), base_rate=0.05, strength=20.0)
    np.testing.assert_allclose(a, [1.0, 4.0])
    np.testing.assert_allclose(b, [19.0, 26.0])


# one step, σ = 1, δ = 1e-5: ε = min_α α/2 + ln(1e5)/(α−1); α−1 = √(2·ln 1e5) = 4.7985 → ε = 5.2985
def test_dp_epsilon_hand_computed_and_monotone():
    from privads.ranker.updates import dp_epsilon

    assert dp_epsilon(1, 1.0, 1e-5) == pytest.approx(0.5 + 2 * np.sqrt(np.log(1e5) / 2), abs=2e-3)
    assert dp_epsilon(0, 1.0, 1e-5) == 0.0
    assert dp_epsilon(10, 1.0, 1e-5) < dp_epsilon(100, 1.0, 1e-5)  # more updates, less privacy
    assert dp_epsilon(100, 2.0, 1e-5) < dp_epsilon(100, 1.0, 1e-5)  # more noise, more privacy


# DP mode: each example's gradient is clipped to C before the noise; with no noise the step is the clipped gradient
def test_dp_clipping_bounds_each_step():
    from privads.ranker.updates import update_many

    d = 4
    m = np.zeros((1, d), np.float32)
    q = np.full((1, d), 16.0, np.float32)
    p = np.array([[1.0, 0, 0, 0]], np.float32)
    params = UpdateParams(learning_rate=1.0, max_step=10.0, l2_prior=0.0, bias=0.0, dp_clip=0.1, dp_noise=0.0)
    m2, _ = update_many(m, q, np.array([0]), p, np.array([1.0]), np.zeros(d), params, np.random.default_rng(0))
    # gradient (σ(0) − 1)·p = −0.5·p, clipped to norm 0.1 → the user moves +0.1 along p
    np.testing.assert_allclose(m2[0], [0.1, 0, 0, 0], atol=1e-7)
    noisy = UpdateParams(learning_rate=1.0, max_step=10.0, l2_prior=0.0, bias=0.0, dp_clip=0.1, dp_noise=2.0)
    draws = np.stack([update_many(m, q, np.array([0]), p, np.array([1.0]), np.zeros(d), noisy,
                                  np.random.default_rng(s))[0][0] for s in range(4000)])
    # noise std per coordinate = σ·C·lr = 0.2 (4 s.e. of a std estimate over 4000 draws ≈ 0.009)
    assert abs(draws[:, 1].std() - 0.2) < 0.01 and abs(draws[:, 0].mean() - 0.1) < 0.02
    with pytest.raises(ValueError, match="rng"):
        update_many(m, q, np.array([0]), p, np.array([1.0]), np.zeros(d), noisy)


# --- learn_events: fast negatives, completed by the click ---------------------------------


def _step(mean, precision, ads, clicked, params, prior):
    """One labelled impression through ``update_user``."""
    return update_user(np.asarray(mean, np.float32), np.asarray(precision, np.float32), np.asarray(ads, np.float32),
                       np.asarray(clicked), np.asarray(prior, np.float32), params)


def _events(mean, precision, ads, kinds, params, prior=None):
    mean, precision = np.asarray(mean, np.float32)[None], np.asarray(precision, np.float32)[None]
    ads = np.asarray(ads, np.float32)
    prior = np.zeros(mean.shape[1], np.float32) if prior is None else np.asarray(prior, np.float32)
    m, q = learn_events(mean, precision, np.zeros(len(kinds), np.int64), ads, np.asarray(kinds), prior, params)
    return m[0], q[0]


def test_an_impression_alone_is_the_negative_step() -> None:
    params = _params(lr=0.5, max_step=5.0, l2=0.1, bias=-1.0)
    m0, q0, prior, p = [0.3, -0.2], [2.0, 3.0], [0.1, 0.1], [[0.6, 0.8]]
    m, q = _events(m0, q0, p, [IMPRESSION], params, prior)
    want_m, want_q = _step(m0, q0, p, [0], params, prior)
    np.testing.assert_allclose(m, want_m, rtol=1e-6)
    np.testing.assert_allclose(q, want_q, rtol=1e-6)


def test_a_click_after_its_impression_completes_the_positive_step() -> None:
    params = _params(lr=0.5, max_step=5.0, l2=0.1, bias=-1.0)
    m0, q0, prior, p = [0.3, -0.2], [2.0, 3.0], [0.1, 0.1], [[0.6, 0.8]]
    m, q = _events(m0, q0, p + p, [IMPRESSION, CLICK], params, prior)
    want_m, want_q = _step(m0, q0, p, [1], params, prior)
    np.testing.assert_allclose(m, want_m, rtol=1e-6)
    np.testing.assert_allclose(q, want_q, rtol=1e-6)
    # the click's half is exactly η·p toward the ad and carries no information
    m_imp, q_imp = _events(m0, q0, p, [IMPRESSION], params, prior)
    np.testing.assert_allclose(m - m_imp, 0.5 * np.asarray(p[0]), rtol=1e-6)
    np.testing.assert_array_equal(q, q_imp)


def test_each_half_is_clipped_on_its_own() -> None:
    params = _params(lr=2.0, max_step=0.5, l2=0.0, bias=0.0)
    m, _ = _events([0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]], [CLICK], params)
    np.testing.assert_allclose(m, [0.5, 0.0], rtol=1e-6)  # η·p = 2 clipped to 0.5


def test_learn_events_matches_labelled_updates_on_many_users() -> None:
    """Impressions, then the clicks of some: the same states as update_many on the labels, users interleaved."""
    rng = np.random.default_rng(3)
    users, d, n = 7, 4, 60
    params = _params(lr=0.3, max_step=10.0, l2=0.05, bias=-2.0)
    mean = rng.normal(0, 0.3, (users, d)).astype(np.float32)
    prec = rng.uniform(1, 3, (users, d)).astype(np.float32)
    prior = rng.normal(0, 0.1, d).astype(np.float32)
    who = rng.integers(users, size=n)
    ads = rng.normal(0, 1, (n, d)).astype(np.float32)
    ads /= np.linalg.norm(ads, axis=1, keepdims=True)
    y = (rng.random(n) < 0.3).astype(np.float32)
    # each impression followed at once by its click, if any: the labelled step, event by event
    idx, vecs, kinds = [], [], []
    for i in range(n):
        for kind in (IMPRESSION, CLICK) if y[i] else (IMPRESSION,):
            idx.append(who[i])
            vecs.append(ads[i])
            kinds.append(kind)
    m, q = learn_events(mean, prec, np.array(idx), np.array(vecs), np.array(kinds), prior, params)
    want_m, want_q = update_many(mean, prec, who, ads, y, prior, params)
    np.testing.assert_allclose(m, want_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q, want_q, rtol=1e-6)


def test_learn_events_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="IMPRESSION or CLICK"):
        _events([0.0], [1.0], [[1.0]], [2], _params())


# --- population_prior ---------------------------------------------------------------


def test_population_prior_is_the_users_mean_shrunk_toward_zero() -> None:
    total = np.array([3.0, -6.0])
    np.testing.assert_allclose(population_prior(total, 3, 0.0), [1.0, -2.0])  # the plain mean
    np.testing.assert_allclose(population_prior(total, 3, 3.0), [0.5, -1.0])  # three pseudo-users at 0
    assert population_prior(total, 3, 3.0).dtype == np.float32
    np.testing.assert_array_equal(population_prior(np.zeros(2), 0, 0.0), [0.0, 0.0])  # nobody learned yet
    with pytest.raises(ValueError, match="≥ 0"):
        population_prior(total, -1, 1.0)


def test_an_offset_is_a_known_logit_of_the_event() -> None:
    """The ad's log calibration factor shifts z: the same step as a bias shifted by it."""
    m0, q0, p = [0.3, -0.2], [2.0, 3.0], [[0.6, 0.8]]
    params = _params(lr=0.5, max_step=5.0, bias=-1.0)
    mean, precision = np.asarray(m0, np.float32)[None], np.asarray(q0, np.float32)[None]
    m, q = learn_events(mean, precision, np.zeros(1, np.int64), np.asarray(p, np.float32), np.array([IMPRESSION]),
                        np.zeros(2, np.float32), params, offset=np.array([math.log(0.25)]))
    want_m, want_q = _step(m0, q0, p, [0], _params(lr=0.5, max_step=5.0, bias=-1.0 + math.log(0.25)), [0.0, 0.0])
    np.testing.assert_allclose(m[0], want_m, rtol=1e-6)
    np.testing.assert_allclose(q[0], want_q, rtol=1e-6)
    # an ad that the evidence already rates low teaches the user less from its non-click
    m_plain, _ = _events(m0, q0, p, [IMPRESSION], params)
    assert np.linalg.norm(m[0] - np.asarray(m0)) < np.linalg.norm(m_plain - np.asarray(m0))


# --- DP: the noise's source, and the mechanism on neighbouring event streams ---------------------------------------


def test_dp_noise_comes_from_os_entropy_and_the_seed_only_without_dp() -> None:
    from privads.ranker.updates import noise_rng

    # two workers with the same settings: with DP their noise differs, without it the (unused) generator is seeded
    a, b = noise_rng(True, 0).standard_normal(8), noise_rng(True, 0).standard_normal(8)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(noise_rng(False, 0).standard_normal(8), noise_rng(False, 0).standard_normal(8))


def test_dp_mechanism_on_neighbouring_streams_stays_within_the_accountants_epsilon() -> None:
    """An audit of the mechanism: one click more or less, and what an observer of the user's vector can tell.

    20,000 users see the same impression; in stream A each also clicks it, in the
    neighbouring stream A' not. From the users' final vectors, the best threshold
    test on ``m·p`` gives an empirical privacy loss ``log P_A[m·p > t] / P_A'[m·p > t]``
    that the accountant's ε for these updates (``dp_epsilon``, two steps: the impression's
    half and the click's) must bound. The shift and the noise the accountant assumes
    (sensitivity C, noise σC per step) are checked too: unclipped, the click would move
    the mean by lr·|p| = 1.5; unnoised, the loss would be infinite.
    """
    from privads.ranker.updates import dp_epsilon, noise_rng

    n, d, delta = 20_000, 4, 1e-5
    p = np.array([[3.0, 0.0, 0.0, 0.0]], np.float32)  # an ad vector of norm 3: the clipping must bound its pull
    params = UpdateParams(learning_rate=0.5, max_step=100.0, l2_prior=0.0, bias=-2.0, dp_clip=1.0, dp_noise=1.0)

    def final(kinds: list[int]) -> np.ndarray:
        users = np.repeat(np.arange(n), len(kinds))
        m, q = learn_events(np.zeros((n, d), np.float32), np.full((n, d), 16.0, np.float32), users,
                            np.repeat(p, n * len(kinds), axis=0), np.tile(np.array(kinds), n), np.zeros(d, np.float32),
                            params, noise_rng(True, 0))
        return m[:, 0]

    with_click, without = final([IMPRESSION, CLICK]), final([IMPRESSION])
    # the click moves the mean by at most lr·C along p; here it does (−y·p, clipped to C, is a full step)
    assert 0.4 < with_click.mean() - without.mean() < 0.6
    assert abs(without.std() - 0.5) < 0.02  # one noised step: lr·σ·C
    losses = []
    for t in np.quantile(without, [0.9, 0.99, 0.999]):
        pa, pb = (with_click > t).mean(), (without > t).mean()
        losses.append(np.log(max(pa - delta, 1e-12) / pb))
    eps = dp_epsilon(2, params.dp_noise, delta)
    assert max(losses) > 0.5  # the test can see a click: it is not vacuous
    assert max(losses) <= eps, (losses, eps)
