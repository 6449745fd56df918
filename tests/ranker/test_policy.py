"""Every served policy (``ranker.policy``) passes the generic policy checks; the interface's own contract."""

from __future__ import annotations

import numpy as np
import pytest
from policy_checks import CHECKS, full_slate

from privads.infra.errors import InvalidInput
from privads.ranker.policy import (
    Policy,
    PopularityPolicy,
    Slate,
    ThompsonParams,
    ThompsonPolicy,
    UniformPolicy,
    thompson_policy,
)
from privads.ranker.scoring import AdEvidence, Ranked

SERVED = {
    "thompson": lambda seed: ThompsonPolicy(ThompsonParams(draws=32), None, np.random.default_rng(seed)),
    "popularity": lambda seed: PopularityPolicy(0.05, 20.0),
    "uniform": lambda seed: UniformPolicy(np.random.default_rng(seed)),
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(SERVED))
def test_every_served_policy_passes_the_generic_checks(name: str, check) -> None:
    check(SERVED[name], full_slate())


def test_a_subclass_overrides_only_rank_and_inherits_the_checks() -> None:
    class Last(Policy):
        name = "last"
        deterministic = True

        def _rank(self, slate: Slate, k: int) -> Ranked:
            index = np.arange(slate.size)[::-1][:k]
            return Ranked(index, np.zeros(k), np.ones(k))

    for check in CHECKS:
        check(lambda seed: Last(), full_slate())
    with pytest.raises(TypeError):
        Policy()  # type: ignore[abstract]


def test_the_thompson_policy_is_thompson_policy_of_the_slate() -> None:
    s = full_slate(n=30, seed=2)
    params = ThompsonParams(draws=16, shortlist=10)
    got = ThompsonPolicy(params, None, np.random.default_rng(4)).rank(s, 5)
    assert s.mean is not None and s.precision is not None and s.vectors is not None and s.bids is not None
    assert s.category_ids is not None and s.clicks is not None and s.expected is not None
    want = thompson_policy(s.mean, s.precision, s.count, s.vectors, s.bids, s.category_ids, s.context, None,
                           s.clicks, s.expected, 5, params, np.random.default_rng(4))
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_array_equal(got.propensity, want.propensity)


def test_popularity_ranks_by_posterior_mean_ctr_times_bid_with_ties_to_the_earlier_candidate() -> None:
    s = Slate(np.arange(4), clicks=np.array([0, 5, 5, 1]), shown=np.array([0, 10, 10, 100]),
              bids=np.array([1.0, 1.0, 1.0, 3.0]))
    r = PopularityPolicy(0.1, 10.0).rank(s, 4)
    # (0.1·10 + c) / (10 + m) × bid: 0.1, 0.3, 0.3, 0.0545…
    np.testing.assert_array_equal(r.index, [1, 2, 0, 3])
    np.testing.assert_allclose(r.score, [0.3, 0.3, 0.1, 2.0 / 110 * 3])


def test_the_uniform_policy_shows_every_candidate_at_every_slot_equally_often() -> None:
    policy = UniformPolicy(np.random.default_rng(0))
    lists = policy.sample_lists(Slate(np.arange(5)), 2, 20_000)
    first = np.bincount(lists[:, 0], minlength=5) / 20_000
    second = np.bincount(lists[:, 1], minlength=5) / 20_000
    np.testing.assert_allclose(first, 0.2, atol=0.015)
    np.testing.assert_allclose(second, 0.2, atol=0.015)
    assert (lists[:, 0] != lists[:, 1]).all()


def test_a_missing_field_is_named() -> None:
    with pytest.raises(InvalidInput, match="slate.clicks"):
        PopularityPolicy(0.05, 20.0).rank(Slate(np.arange(3), bids=np.ones(3)), 2)


def test_the_users_own_factor_multiplies_each_candidates_calibration_and_is_logged() -> None:
    s = full_slate(n=30, seed=2)
    params = ThompsonParams(draws=32, shortlist=30)
    assert s.mean is not None and s.precision is not None and s.vectors is not None and s.bids is not None
    assert s.category_ids is not None and s.clicks is not None and s.expected is not None
    plain = thompson_policy(s.mean, s.precision, s.count, s.vectors, s.bids, s.category_ids, s.context, None,
                            s.clicks, s.expected, 5, params, np.random.default_rng(4))
    assert plain.user_factor is None
    # the user's own factor sinks the five ads shown first, as a category the user never clicks would
    psi = np.ones(30)
    psi[plain.index] = 1e-3
    got = ThompsonPolicy(params, None, np.random.default_rng(4)).rank(
        Slate(**{**{f: getattr(s, f) for f in s.__dataclass_fields__}, "user_factor": psi}), 5)
    assert not set(got.index.tolist()) & set(plain.index.tolist())
    np.testing.assert_array_equal(got.user_factor, psi[got.index])
    # the factor logged is ψ times the ad's own posterior mean (the stream divides ψ back out of it)
    np.testing.assert_allclose(got.factor, got.user_factor * AdEvidence(
        s.clicks, s.expected, params.calibration_strength).take(got.index).mean())
