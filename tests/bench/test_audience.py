"""The simulated audience's ground truth: oracle, random baseline and efficiency, by hand and by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from privads.bench.audience import efficiency, make_audience


def test_audience_is_seeded_and_its_texts_carry_their_topic() -> None:
    a, b = make_audience(30, 40, seed=4), make_audience(30, 40, seed=4)
    assert a.ad_texts == b.ad_texts and np.array_equal(a.interest, b.interest)
    assert make_audience(30, 40, seed=5).ad_texts != a.ad_texts
    assert len(set(a.ad_texts)) == 40 and np.allclose(a.interest.sum(axis=1), 1.0)
    from privads.bench.audience import TOPICS

    for text, t in zip(a.ad_texts, a.ad_topic, strict=True):
        assert any(noun in text for noun in TOPICS[a.topics[t]][0])


def test_oracle_is_the_best_list_and_random_is_the_mean_over_lists() -> None:
    aud = make_audience(3, 7, seed=1)
    k = 3
    for user in range(aud.users):
        lists = [np.array(p) for p in itertools.permutations(range(7), k)]
        ctrs = np.array([aud.click_probability(user, lst).mean() for lst in lists])
        assert aud.oracle_ctr(user, k) == pytest.approx(ctrs.max())
        assert aud.random_ctr(user, k) == pytest.approx(ctrs.mean())


def test_efficiency_is_zero_for_random_and_one_for_the_oracle() -> None:
    oracle, random = np.array([0.3, 0.2]), np.array([0.1, 0.05])
    assert efficiency(oracle, oracle, random) == 1.0 and efficiency(random, oracle, random) == 0.0
    assert efficiency(np.array([0.2, 0.05]), oracle, random) == pytest.approx(0.1 / 0.35)
    assert np.isnan(efficiency(random, random, random))


def test_value_oracle_is_the_best_list_of_the_whole_world_and_random_the_mean_of_the_audiences() -> None:
    aud = make_audience(3, 6, seed=2).with_bids(np.array([1.0, 0.5, 2.0, 1.0, 3.0, 0.2]), np.array([4.0, 0.1]))
    k = 3
    value = lambda user, i: ((aud.base + aud.gain * aud.interest[user, aud.ad_topic[i]]) * aud.bids[i]  # noqa: E731
                             if i < 6 else aud.base * aud.other_bids[i - 6])
    for user in range(aud.users):
        lists = list(itertools.permutations(range(8), k))
        per_slot = [np.mean(aud.position_bias[:k] * np.array([value(user, i) for i in lst])) for lst in lists]
        assert aud.oracle_value(user, k) == pytest.approx(max(per_slot))
        mine = [np.mean(aud.position_bias[:k] * np.array([value(user, i) for i in lst]))
                for lst in itertools.permutations(range(6), k)]
        assert aud.random_value(user, k) == pytest.approx(np.mean(mine))


def test_bids_are_drawn_from_the_catalogs_and_default_to_one() -> None:
    from privads.bench.audience import draw_bids

    catalog = np.array([0.5, 1.0, 5.65])
    drawn = draw_bids(catalog, 1000, np.random.default_rng(0))
    assert set(np.unique(drawn)) == set(catalog) and drawn.max() <= catalog.max()
    assert np.array_equal(draw_bids(np.zeros(0), 4, np.random.default_rng(0)), np.ones(4))
    assert np.array_equal(make_audience(2, 5, seed=0).bids, np.ones(5))
    with pytest.raises(ValueError, match="bids"):
        make_audience(2, 5, seed=0).with_bids(np.ones(4))


def test_simulate_draws_its_ads_bids_from_the_catalog_file_never_above_it(tmp_path) -> None:
    from privads.bench.simulate import audience_bids, catalog_bids

    path = tmp_path / "catalog.jsonl"
    path.write_text('{"ad_id": "a", "text": "x", "bid": 0.5}\n{"ad_id": "b", "text": "y", "bid": 5.65}\n'
                    '{"ad_id": "c", "text": "z", "bid": 9.0, "active": false}\n\n')
    others = catalog_bids(path)
    assert others == {"a": 0.5, "b": 5.65}  # the inactive ad is not shown, so not a bid to draw from
    drawn = audience_bids(200, None, others, seed=1)
    assert set(np.unique(drawn)) == {0.5, 5.65}
    assert np.array_equal(audience_bids(200, None, others, seed=1), drawn)
    assert np.array_equal(audience_bids(3, 2.0, others, seed=1), [2.0, 2.0, 2.0])
    assert np.array_equal(audience_bids(3, None, catalog_bids(None), seed=1), np.ones(3))


def test_request_context_scales_topics_and_leaves_the_rest_of_the_world_as_it_was() -> None:
    plain, ctx = make_audience(20, 30, seed=3), make_audience(20, 30, seed=3, context_strength=0.7)
    assert ctx.ad_texts == plain.ad_texts and np.array_equal(ctx.interest, plain.interest)
    assert plain.contexts == [] and len(ctx.contexts) == 4
    assert {c["device"] for c in ctx.contexts} == {"mobile", "desktop"}
    np.testing.assert_allclose(ctx.context_effect.mean(axis=0), 1.0)
    assert ctx.context_effect.std() > 0.3  # a real effect, for a ranker to learn
    ads = np.arange(5)
    for c in range(4):
        want = ctx.position_bias[:5] * np.minimum(
            ctx.base + ctx.gain * ctx.interest[0, ctx.ad_topic[ads]] * ctx.context_effect[c, ctx.ad_topic[ads]], 1)
        np.testing.assert_allclose(ctx.click_probability(0, ads, c), want)
        best = np.sort(ctx.ctr(0, c))[::-1][:3]
        assert ctx.oracle_ctr(0, 3, c) == pytest.approx(float(np.mean(ctx.position_bias[:3] * best)))
    # without a context the truth is the context-free one
    np.testing.assert_allclose(ctx.click_probability(0, ads), plain.click_probability(0, ads))
