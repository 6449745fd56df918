"""The policies of ``privads bench policies``: each a valid, seeded bandit, and PrivAds' the one that learns most."""

from __future__ import annotations

import numpy as np
import pytest
from policy_checks import CHECKS

from privads.bench.audience import make_audience
from privads.bench.peers import PrivAdsPolicy
from privads.bench.policies import make_policies, run_policies
from privads.infra.settings import Settings
from privads.ranker.policy import Slate

ALL = ("privads", "random", "popularity", "river-thompson", "vowpalwabbit")


@pytest.fixture(scope="module")
def audience():
    return make_audience(60, 40, seed=4)


@pytest.fixture(scope="module")
def vectors(audience):
    # the topic structure the encoder finds in the texts, without the encoder: a unit centroid per topic plus noise
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((len(audience.topics), 16))
    v = centroids[audience.ad_topic] + 0.8 * rng.standard_normal((len(audience.ad_ids), 16))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _settings() -> Settings:
    return Settings(d_user=16, kafka="unused:1", redis="redis://unused")


def _slate(audience, user: int) -> Slate:
    n = len(audience.ad_ids)
    return Slate(np.arange(n), user, bids=np.ones(n))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ALL)
def test_every_peer_passes_the_generic_policy_checks(audience, vectors, name: str, check) -> None:
    def make(seed: int):
        (policy,) = make_policies((name,), audience, vectors, _settings(), seed=seed, negatives_after=5)
        return policy

    check(make, _slate(audience, 3))


@pytest.mark.parametrize("name", ALL)
def test_every_policy_shows_k_distinct_ads_and_two_seeded_runs_agree(audience, vectors, name: str) -> None:
    runs = []
    for _ in range(2):
        (policy,) = make_policies((name,), audience, vectors, _settings(), seed=3, negatives_after=5)
        shown = []
        rng = np.random.default_rng(1)
        for u in rng.integers(audience.users, size=60).tolist():
            slate = _slate(audience, u)
            ranked = policy.rank(slate, 10)
            ads = slate.rows[ranked.index]
            assert ads.shape == (10,) and len(set(ads.tolist())) == 10
            assert ads.min() >= 0 and ads.max() < len(audience.ad_ids)
            policy.learn(slate, ranked, rng.random(10) < audience.click_probability(u, ads))
            shown.append(ads.tolist())
        runs.append(shown)
    assert runs[0] == runs[1]


def test_privads_learns_clicks_at_once_and_negatives_when_their_window_closes(audience, vectors) -> None:
    (p,) = make_policies(("privads",), audience, vectors, _settings(), seed=0, negatives_after=2)
    assert isinstance(p, PrivAdsPolicy)
    slate = _slate(audience, 0)
    ranked = p.rank(slate, 5)
    ads = slate.rows[ranked.index]
    p.learn(slate, ranked, np.array([True, False, False, False, False]))
    assert p.count[0] == 1 and p.clicks[ads[0]] == 1  # the click, at once
    assert p.expected[ads].min() > 0 and p.shown[ads].min() == 1  # every shown ad, with the pCTR it was served at
    for u in (1, 2):
        other = _slate(audience, u)
        p.learn(other, p.rank(other, 5), np.zeros(5, bool))
    assert p.count[0] == 5  # two requests later, its four negatives


def test_privads_beats_every_peer_and_random_is_zero_on_a_small_audience(audience, vectors) -> None:
    out = run_policies(audience, make_policies(ALL, audience, vectors, _settings(), seed=0, negatives_after=None),
                       3000, 10, seed=0)
    eff = {n: r["efficiency"] for n, r in out["policies"].items()}
    assert abs(eff["random"]) < 0.05  # by construction, up to sampling noise
    assert eff["privads"] > 0.3, eff
    assert all(eff["privads"] > eff[n] + 0.05 for n in ALL if n != "privads"), eff
    curve = out["policies"]["privads"]["curve"]
    assert len(curve) == len(out["requests_at"]) and curve[-1] == eff["privads"]
    assert out["policies"]["privads"]["efficiency_last_quarter"] > eff["privads"]  # it is still learning


def test_common_random_numbers_give_the_same_clicks_to_the_same_lists(audience, vectors) -> None:
    a, b = make_policies(("random", "random"), audience, vectors, _settings(), seed=5, negatives_after=None)
    out = run_policies(audience, [a], 500, 10, seed=1)["policies"]["random"]
    again = run_policies(audience, [b], 500, 10, seed=1)["policies"]["random"]
    assert out["clicks"] == again["clicks"] and out["efficiency"] == again["efficiency"]


def test_an_unknown_policy_is_refused_by_name(audience, vectors) -> None:
    with pytest.raises(ValueError, match="unknown policy 'magic'"):
        make_policies(("magic",), audience, vectors, _settings(), seed=0, negatives_after=None)


def test_a_missing_bench_dependency_is_named_with_its_extra() -> None:
    from privads.bench import optional
    from privads.infra.errors import NotFound

    with pytest.raises(NotFound, match=r"no_such_module_xyz is not installed: .*privads\[bench\]"):
        optional("no_such_module_xyz")
    assert optional("numpy") is np
