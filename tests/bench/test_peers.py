"""The policies of ``privads bench policies``: each a valid, seeded bandit, and PrivAds' the one that learns most."""

from __future__ import annotations

import numpy as np
import pytest
from policy_checks import CHECKS

from privads.bench.audience import make_audience
from privads.bench.peers import PrivAdsPolicy
from privads.bench.policies import World, by_top_topic, make_policies, run_policies
from privads.infra.settings import Settings
from privads.ranker.policy import Slate
from privads.ranker.updates import update_many

ALL = ("privads", "random", "popularity", "river-thompson", "vowpalwabbit")


@pytest.fixture(scope="module")
def audience():
    return make_audience(60, 40, seed=4)


@pytest.fixture(scope="module")
def world(audience):
    """The audience's 40 ads at bid 1 beside 20 catalog ads at bid 3 (two categories) that it clicks at base rate.

    The topic structure the encoder finds in the texts, without the encoder: a unit centroid per topic plus noise.
    """
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((len(audience.topics) + 2, 16))
    groups = np.r_[audience.ad_topic, len(audience.topics) + np.arange(20) % 2]
    v = centroids[groups] + 0.8 * rng.standard_normal((groups.size, 16))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    aud = audience.with_bids(np.ones(40), np.full(20, 3.0))
    categories = [audience.topics[t] for t in audience.ad_topic] + [f"catalog-{i % 2}" for i in range(20)]
    return World(aud, audience.ad_texts + [f"catalog ad {i}" for i in range(20)], categories, v)


def _settings() -> Settings:
    return Settings(d_user=16, kafka="unused:1", redis="redis://unused", candidates=30)


def _slate(world: World, user: int) -> Slate:
    return Slate(np.arange(len(world.texts)), user, bids=world.bids)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ALL)
def test_every_peer_passes_the_generic_policy_checks(world, name: str, check) -> None:
    def make(seed: int):
        (policy,) = make_policies((name,), world, _settings(), seed=seed)
        return policy

    check(make, _slate(world, 3))


@pytest.mark.parametrize("name", ALL)
def test_every_policy_shows_k_distinct_ads_and_two_seeded_runs_agree(world, name: str) -> None:
    runs = []
    aud = world.audience
    for _ in range(2):
        (policy,) = make_policies((name,), world, _settings(), seed=3)
        shown = []
        rng = np.random.default_rng(1)
        for u in rng.integers(aud.users, size=60).tolist():
            slate = _slate(world, u)
            ranked = policy.rank(slate, 10)
            ads = slate.rows[ranked.index]
            assert ads.shape == (10,) and len(set(ads.tolist())) == 10
            assert ads.min() >= 0 and ads.max() < len(world.texts)
            policy.learn(slate, ranked, rng.random(10) < aud.click_probability(u, ads))
            shown.append(ads.tolist())
        runs.append(shown)
    assert runs[0] == runs[1]


def test_privads_learns_every_shown_ad_as_a_fast_negative_and_each_click_as_its_positive(world) -> None:
    (p,) = make_policies(("privads",), world, _settings(), seed=0)
    assert isinstance(p, PrivAdsPolicy)
    slate = _slate(world, 0)
    ranked = p.rank(slate, 5)
    ads = slate.rows[ranked.index]
    m0, q0 = p.mean[0].copy(), p.precision[0].copy()
    p.learn(slate, ranked, np.array([True, False, False, False, False]))
    assert p.count[0] == 5 and p.clicks[ads[0]] == 1  # five impressions, one of them clicked
    assert p.expected[ads].min() > 0 and p.shown[ads].min() == 1  # every shown ad, with the pCTR it was served at
    # the stream's update: five negatives at once, then the click's step η·p toward its ad (no clip at these sizes)
    neg_m, neg_q = update_many(m0[None], q0[None], np.zeros(5, np.int64), p.vectors[ads], np.zeros(5), p.prior,
                               p.update)
    np.testing.assert_allclose(p.mean[0], neg_m[0] + p.update.learning_rate * p.vectors[ads[0]], atol=1e-5)
    np.testing.assert_allclose(p.precision[0], neg_q[0], rtol=1e-6)
    assert float(p.mean[0] @ p.vectors[ads[0]]) > float(m0 @ p.vectors[ads[0]])  # toward the clicked ad


def test_privads_counts_each_users_tastes_as_the_workers_do(world) -> None:
    (p,) = make_policies(("privads",), world, _settings(), seed=0)
    assert isinstance(p, PrivAdsPolicy) and p.taste_strength == _settings().taste_strength > 0
    first = p.rank(_slate(world, 0), 5)
    assert first.user_factor is not None and np.all(first.user_factor == 1.0)  # nothing shown yet: the population's
    slate = _slate(world, 0)
    ads = slate.rows[first.index]
    p.learn(slate, first, np.array([True, False, False, False, False]))
    groups = p.catalog.group_ids[ads]
    want_e = np.bincount(groups, weights=first.pctr * first.factor / first.user_factor, minlength=len(p.catalog.groups))
    np.testing.assert_allclose(p.taste_expected[0], want_e)
    assert p.taste_clicks[0, groups[0]] == 1 and p.taste_clicks[0].sum() == 1
    assert p.taste_clicks[1:].sum() == 0 and p.taste_expected[1:].sum() == 0  # another user's are untouched
    np.testing.assert_array_equal(p.taste_shown[0], np.bincount(groups, minlength=len(p.catalog.groups)))
    again = p.rank(_slate(world, 0), len(world.texts))  # every ad: each category's ψ is the user's now
    g = p.catalog.group_ids[_slate(world, 0).rows[again.index]]
    b = p.taste_strength
    np.testing.assert_allclose(again.user_factor, (b + p.taste_clicks[0, g]) / (b + p.taste_expected[0, g]))
    # past the window, the counts are scaled back as the workers' are (``keys.window_tastes``); off by default
    assert p.taste_window == _settings().taste_window == 0
    (windowed,) = make_policies(("privads",), world, _settings().model_copy(update={"taste_window": 7.0}), seed=0)
    assert isinstance(windowed, PrivAdsPolicy) and windowed.taste_window == 7.0
    p.taste_window = 1.0
    before = {name: getattr(p, name)[0].copy() for name in ("taste_clicks", "taste_expected", "taste_shown")}
    slate = _slate(world, 0)
    nxt = p.rank(slate, 5)
    p.learn(slate, nxt, np.zeros(5, bool))
    assert p.taste_shown[0].max() == 1.0
    more = np.bincount(p.catalog.group_ids[slate.rows[nxt.index]], minlength=len(p.catalog.groups))
    scale = 1.0 / np.maximum(before["taste_shown"] + more, 1.0)
    np.testing.assert_allclose(p.taste_clicks[0], before["taste_clicks"] * scale)


def test_privads_beats_every_peer_in_a_world_where_the_catalog_outbids_the_audience(world) -> None:
    out = run_policies(world, make_policies(ALL, world, _settings(), seed=0), 3000, 10, seed=0)
    # seen: PrivAds 0.38 (clicks) and 0.40 (value) over the run, 0.64 and 0.65 in its last quarter; no peer above 0.09
    for what in ("efficiency", "value_efficiency"):
        eff = {n: r[what] for n, r in out["policies"].items()}
        assert out["policies"]["privads"][f"{what}_last_quarter"] > 0.3, (what, eff)
        assert all(eff["privads"] > eff[n] + 0.1 for n in ALL if n != "privads"), (what, eff)
    pa = out["policies"]["privads"]
    assert len(pa["curve"]) == len(out["requests_at"]) and pa["curve"][-1] == pa["efficiency"]
    assert pa["efficiency_last_quarter"] > pa["efficiency"]  # it is still learning
    assert out["label_delay"] == 100 and out["oracle_value"] > out["random_value"] > 0


def test_the_last_quarter_is_split_by_each_users_strongest_topic(world) -> None:
    out = run_policies(world, make_policies(("random", "privads"), world, _settings(), seed=0), 400, 10, seed=0)
    aud = world.audience
    users = np.random.default_rng([0, 7]).integers(aud.users, size=400)[-100:]  # run_policies' requests
    want = {aud.topics[t]: n for t, n in zip(*np.unique(aud.interest[users].argmax(axis=1), return_counts=True),
                                              strict=True)}
    for name in ("random", "privads"):
        split = out["policies"][name]["by_top_topic"]
        assert {t: v["requests"] for t, v in split.items()} == want
        assert sum(v["span_share"] for v in split.values()) == pytest.approx(1.0, abs=1e-3)
        # the whole quarter's efficiency is the span-weighted mean of the topics'
        assert sum(v["span_share"] * v["efficiency"] for v in split.values()) == pytest.approx(
            out["policies"][name]["efficiency_last_quarter"], abs=2e-3)


def test_by_top_topic_on_a_hand_made_quarter() -> None:
    top = np.array([0, 0, 2, 2])
    expected, oracle, random = np.array([0.3, 0.1, 0.1, 0.1]), np.full(4, 0.3), np.full(4, 0.1)
    got = by_top_topic(["a", "b", "c"], top, expected, oracle, random)
    assert got == {"a": {"requests": 2, "span_share": 0.5, "efficiency": 0.5},
                   "c": {"requests": 2, "span_share": 0.5, "efficiency": 0.0}}  # "b": no request, left out


def test_common_random_numbers_give_the_same_clicks_to_the_same_lists(world) -> None:
    a, b = make_policies(("random", "random"), world, _settings(), seed=5)
    out = run_policies(world, [a], 500, 10, seed=1)["policies"]["random"]
    again = run_policies(world, [b], 500, 10, seed=1)["policies"]["random"]
    assert out["clicks"] == again["clicks"] and out["efficiency"] == again["efficiency"]


def test_every_policy_gets_its_labels_on_the_same_schedule(world) -> None:
    seen: dict[str, list[int]] = {}  # policy → the number of requests served when each label arrived
    for name in ("random", "popularity", "privads"):
        (p,) = make_policies((name,), world, _settings(), seed=0)
        served = [0]
        learn = p.learn

        def spy(*args, _p=p, _served=served, _name=name, _learn=learn):
            seen.setdefault(_name, []).append(_served[0])
            return _learn(*args)

        rank = p.rank

        def count(*args, _served=served, _rank=rank):
            _served[0] += 1
            return _rank(*args)

        p.learn, p.rank = spy, count  # type: ignore[method-assign]
        run_policies(world, [p], 300, 5, seed=2, label_delay=40)
    assert seen["random"] == seen["popularity"] == seen["privads"]
    assert seen["random"][0] == 41 and len(seen["random"]) == 260  # request i's labels arrive after request i + 40


def test_an_unknown_policy_is_refused_by_name(world) -> None:
    with pytest.raises(ValueError, match="unknown policy 'magic'"):
        make_policies(("magic",), world, _settings(), seed=0)


def test_a_missing_bench_dependency_is_named_with_its_extra() -> None:
    from privads.bench import optional
    from privads.infra.errors import NotFound

    with pytest.raises(NotFound, match=r"no_such_module_xyz is not installed: .*privads\[bench\]"):
        optional("no_such_module_xyz")
    assert optional("numpy") is np
