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
