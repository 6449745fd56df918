"""Exploration over the whole catalog (issue 14): pooled calibration by category, retrieval keys that follow the
evidence, and the logged propensity of the whole pipeline (retrieval included) against brute-force Monte-Carlo."""

from __future__ import annotations

import numpy as np
import pytest

from privads.infra import keys
from privads.infra.settings import Settings
from privads.ranker.adcounts import AdCounts, RowCounts
from privads.ranker.index import ServingCatalog
from privads.ranker.policy import ThompsonParams, ThompsonPolicy
from privads.ranker.scoring import AdEvidence, category_factors, retrieval_keys
from privads.ranker.service import arm_evidence, learned_slate, prior_of, rekey_now, retrieve


def test_category_factors_pool_each_categorys_clicks_over_its_expected_clicks() -> None:
    clicks = np.array([0, 1, 0, 3, 0])
    expected = np.array([10.0, 10.0, 0.0, 2.0, 1.0])
    groups = np.array([0, 0, 0, 1, 2])
    got = category_factors(clicks, expected, groups, 4, strength=5.0)
    np.testing.assert_allclose(got, [(5 + 1) / (5 + 20), (5 + 3) / (5 + 2), 5 / 6, 1.0])


def test_an_ads_factor_starts_at_its_categorys_and_its_own_evidence_moves_it() -> None:
    ev = AdEvidence(np.array([0, 0, 4]), np.array([0.0, 0.0, 1.0]), 5.0, prior=np.array([1.0, 0.2, 0.2]))
    shape, rate = ev.shape_rate()
    np.testing.assert_allclose(shape, [5, 5, 9])
    np.testing.assert_allclose(rate, [5, 25, 26])
    np.testing.assert_allclose(ev.mean(), [1.0, 0.2, 9 / 26])  # a cold ad of a sunk category starts sunk
    np.testing.assert_allclose(ev.take(np.array([2])).mean(), [9 / 26])
    plain = AdEvidence(np.array([2]), np.array([3.0]), 5.0)
    np.testing.assert_allclose(plain.mean(), [7 / 8])  # no prior: mean 1, as before


def test_retrieval_keys_carry_the_log_of_bid_times_factor() -> None:
    ads = np.eye(2, dtype=np.float32)
    k = retrieval_keys(ads, np.array([2.0, 1.0]), np.array([0.25, 1.0]))
    np.testing.assert_allclose(k[:, -1], np.log([0.5, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(retrieval_keys(ads, np.array([2.0, 1.0]))[:, -1], np.log([2.0, 1.0]), rtol=1e-6)


def test_prior_of_gives_a_category_newer_than_the_table_the_neutral_factor() -> None:
    np.testing.assert_allclose(prior_of(np.array([0.5, 2.0]), np.array([1, 0, 3])), [2.0, 0.5, 1.0])


def _world(n_bad: int = 40, d: int = 8, seed: int = 0) -> tuple[ServingCatalog, list[str]]:
    """High-bid ads of one category, and a few cheaper ones of another: the ordinary-bid world in small."""
    rng = np.random.default_rng(seed)
    n = n_bad + 6
    v = rng.standard_normal((n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    bids = np.r_[np.full(n_bad, 4.0), np.ones(6)].astype(np.float32)
    cats = ["pricey"] * n_bad + ["new"] * 6
    ids = [f"ad-{i}" for i in range(n)]
    return ServingCatalog.build(d, ids, v, bids, np.ones(n, bool), cats), ids


def _counts(ids: list[str], shown: dict[str, tuple[int, int, float]], arm: str = "treatment") -> AdCounts:
    counts = AdCounts()
    counts.reset({arm: {a: [c, m, int(e * keys.EXPECTED_SCALE)] for a, (c, m, e) in shown.items()}})
    return counts


def test_a_sunk_category_leaves_the_retrieved_set_and_makes_room_for_the_cheaper_ads() -> None:
    cat, ids = _world()
    settings = Settings(kafka="unused:1", redis="redis://unused")
    rc = RowCounts(cat, "treatment")
    rc.sync(AdCounts())
    user = np.zeros(cat.d, np.float32)
    before = set(retrieve(cat, user, 10).tolist())
    assert before <= set(range(40))  # bid order: only the pricey ads, the new ones have probability 0
    # the pricey category was shown 2,000 times at pCTR 0.05 (100 expected clicks) and clicked once
    rc.sync(_counts(ids, {ids[i]: (1 if i == 0 else 0, 50, 2.5) for i in range(40)}))
    factors = rekey_now(cat, rc, settings)
    assert factors[cat.groups["pricey"]] == pytest.approx((5 + 1) / (5 + 100))
    after = set(retrieve(cat, user, 10).tolist())
    assert set(range(40, 46)) <= after  # every new ad is a candidate now
    again, means = arm_evidence(cat, rc, settings)
    np.testing.assert_array_equal(again, factors)
    np.testing.assert_allclose(cat.factors[:46], means, rtol=1e-6)
    assert cat.drifted(means, settings.rekey_tolerance).size == 0  # nothing left to move


def test_the_logged_propensity_is_the_whole_pipelines_probability_retrieval_included() -> None:
    """Brute force: the pipeline (retrieval → slate → Thompson draws) run 4,000 times on one state; each (ad,
    position)'s frequency against its mean logged propensity, whose expectation is π + (1 − π)/S."""
    cat, ids = _world(n_bad=30, seed=3)
    settings = Settings(kafka="unused:1", redis="redis://unused")
    rc = RowCounts(cat, "treatment")
    shown = {ids[i]: (i % 3, 20 + i, 1.0 + 0.05 * i) for i in range(36)}
    rc.sync(_counts(ids, shown))
    factors = rekey_now(cat, rc, settings)
    rng = np.random.default_rng(1)
    mean = (0.6 * rng.standard_normal(cat.d)).astype(np.float32)
    precision = np.full(cat.d, 6.0, np.float32)
    params = ThompsonParams(draws=32, shortlist=9)
    # the user's tastes are part of the state the propensities are of: "new" was shown to them and half-clicked
    tastes = keys.merge_tastes(keys.no_tastes(), np.array([keys.category_hash("new")], np.uint32), np.ones(1),
                               np.array([2.0]), np.array([30.0]))
    k, runs, n = 3, 4000, len(ids)
    freq, logged = np.zeros((n, k)), np.zeros((n, k))
    retrieved = retrieve(cat, mean, 12)  # candidates < catalog: retrieval decides who can be shown
    for run in range(runs):
        policy = ThompsonPolicy(params, None, np.random.default_rng([7, run]))
        rows = retrieve(cat, mean, 12)
        slate = learned_slate(cat, rc, factors, cat.take(rows), "u", (mean, precision, 2), np.zeros(0, np.int64), None,
                              tastes, 2.0)
        r = policy.rank(slate, k)
        ads = rows[r.index]
        freq[ads, np.arange(k)] += 1
        logged[ads, np.arange(k)] += r.propensity
    pi = freq / runs
    outside = np.setdiff1d(np.arange(n), retrieved)
    assert outside.size > 0 and pi[outside].sum() == 0  # never retrieved: probability 0, never logged
    seen = freq > 0
    mean_logged = logged[seen] / freq[seen]
    want = pi[seen] + (1 - pi[seen]) / params.draws
    # Monte-Carlo error of both sides at 4,000 runs: a few hundredths at most
    assert np.abs(mean_logged - want).max() < 0.05, np.abs(mean_logged - want).max()
    assert np.abs(mean_logged - want).mean() < 0.01


def test_a_category_shown_to_a_user_and_never_clicked_sinks_for_that_user_alone() -> None:
    """The user's own factor on a category (``scoring.user_factors``), from the user state's tastes."""
    cat, ids = _world(n_bad=10)
    rc = RowCounts(cat, "treatment")
    rc.sync(AdCounts())
    rows = np.arange(len(ids))
    state = (np.zeros(cat.d, np.float32), np.full(cat.d, 4.0, np.float32), 0)
    ctx = np.zeros(0, np.int64)
    pricey = keys.category_hash("pricey")
    # shown the pricey ads 800 times, 40 clicks expected of them, none clicked
    tastes = keys.merge_tastes(keys.no_tastes(), np.array([pricey], np.uint32), np.zeros(1), np.array([40.0]),
                               np.array([800.0]))
    got = cat.take(rows)
    mine = learned_slate(cat, rc, None, got, "u", state, ctx, None, tastes, 2.0)
    assert mine.user_factor is not None
    np.testing.assert_allclose(mine.user_factor, np.r_[np.full(10, 2 / 42), np.ones(6)])
    assert learned_slate(cat, rc, None, got, "v", state, ctx, None, keys.no_tastes(), 2.0).user_factor.tolist() \
        == [1.0] * 16  # another user: the population's
    assert learned_slate(cat, rc, None, got, "u", state, ctx, None, tastes, 0.0).user_factor is None  # off
    params = ThompsonParams(draws=16, shortlist=16)
    top = ThompsonPolicy(params, None, np.random.default_rng(0)).rank(
        learned_slate(cat, rc, None, got, "v", state, ctx, None, keys.no_tastes(), 2.0), 3)
    assert set(top.index.tolist()) <= set(range(10))  # by bid, the pricey ads for everyone else
    top = ThompsonPolicy(params, None, np.random.default_rng(0)).rank(mine, 3)
    assert set(top.index.tolist()) <= set(range(10, 16))  # for this user the cheaper category wins
