"""Checks every ``ranker.policy.Policy`` must pass (river's ``river/checks/`` style), run by
``tests/ranker/test_policy.py`` for the served policies and ``tests/bench/test_peers.py`` for the bench's peers.

Each check takes a factory ``make(seed) -> Policy`` (two equal seeds must give two equal policies) and a
full slate (every field filled) that the policy can rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest

from privads.infra.errors import InvalidInput
from privads.ranker.policy import Policy, Slate
from privads.ranker.scoring import position_frequencies

Make = Callable[[int], Policy]


def check_lists_are_distinct_candidates(make: Make, slate: Slate) -> None:
    policy = make(0)
    for k in (1, 3, slate.size, slate.size + 5):
        r = policy.rank(slate, k)
        got = r.index.shape[0]  # at most k; fewer where the policy's own retrieval keeps fewer candidates
        assert 1 <= got <= min(k, slate.size) and (k > 3 or got == k)
        assert r.score.shape == (got,) and r.propensity.shape == (got,)
        assert len(set(r.index.tolist())) == got, "a list shows a candidate twice"
        assert r.index.min() >= 0 and r.index.max() < slate.size


def check_propensities_are_probabilities(make: Make, slate: Slate) -> None:
    r = make(0).rank(slate, 4)
    known = r.propensity[~np.isnan(r.propensity)]
    assert ((known > 0) & (known <= 1)).all(), r.propensity
    if make(0).deterministic:
        np.testing.assert_array_equal(r.propensity, 1.0)


def check_empty_slate_and_bad_k(make: Make, slate: Slate) -> None:
    policy = make(0)
    empty = policy.rank(Slate(np.zeros(0, np.int64)), 5)
    assert empty.index.size == 0 and empty.propensity.size == 0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidInput, match="k: "):
            policy.rank(slate, bad)  # type: ignore[arg-type]


def check_seeded_runs_agree(make: Make, slate: Slate) -> None:
    a, b = make(7), make(7)
    for _ in range(5):
        ra, rb = a.rank(slate, 4), b.rank(slate, 4)
        np.testing.assert_array_equal(ra.index, rb.index)
        np.testing.assert_array_equal(ra.propensity, rb.propensity)


def check_sample_lists_match_the_logged_propensities(make: Make, slate: Slate) -> None:
    """What replay counts (``sample_lists``) and what serving shows and logs (``rank``) describe one distribution.

    Per slot j: the served lists' frequencies match the sampled lists' (total variation), and the mean logged
    propensity of the served ad is ``E[π(a, j)] = Σ_a π(a, j)²`` (a Monte-Carlo propensity over S draws that
    include the served one adds at most 1/S).
    """
    policy = make(3)
    k = min(3, slate.size)
    lists = policy.sample_lists(slate, k, 2000)
    assert lists.shape[1] == k and lists.shape[0] in ((1,) if policy.deterministic else (2000,))
    for row in lists:
        assert len(set(row.tolist())) == k
    if policy.deterministic:
        r = policy.rank(slate, k)
        np.testing.assert_array_equal(lists[0], r.index)
        return
    want = position_frequencies(lists, slate.size)
    served = [policy.rank(slate, k) for _ in range(1000)]
    got = position_frequencies(np.stack([r.index for r in served]), slate.size)
    # two samples of one distribution differ by E|X − Y| ≈ sqrt(2/π)·σ per cell, σ² = π(1 − π)(1/1000 + 1/2000)
    noise = 0.5 * np.sqrt(2 / np.pi) * np.sqrt(want * (1 - want) * (1 / 1000 + 1 / 2000)).sum(axis=0)
    tv = 0.5 * np.abs(got - want).sum(axis=0)
    assert (tv < 2 * noise + 0.03).all(), f"served lists and sampled lists differ: TV {tv} vs noise {noise}"
    logged = np.stack([r.propensity for r in served])
    for j in range(k):
        if np.isnan(logged[:, j]).any():
            continue  # a policy that does not compute this slot's propensity
        assert abs(logged[:, j].mean() - (want[:, j] ** 2).sum()) < 0.07, (j, logged[:, j].mean())


def check_fields_it_needs_are_named(make: Make, slate: Slate) -> None:
    """A slate without a field the policy reads fails with InvalidInput naming the field, not a TypeError."""
    policy = make(0)
    bare = Slate(slate.rows, slate.user)
    try:
        policy.rank(bare, 2)
    except InvalidInput as e:
        assert str(e).startswith("slate.")
    # a policy that needs nothing but the candidates ranks the bare slate


CHECKS = (check_lists_are_distinct_candidates, check_propensities_are_probabilities, check_empty_slate_and_bad_k,
          check_seeded_runs_agree, check_sample_lists_match_the_logged_propensities,
          check_fields_it_needs_are_named)


def yield_checks() -> Iterator[Callable[[Make, Slate], None]]:
    yield from CHECKS


def full_slate(n: int = 12, d: int = 8, seed: int = 0, user: int = 0) -> Slate:
    """A slate with every field filled: unit vectors, bids, counts, a user posterior with some certainty."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    shown = rng.integers(0, 50, n)
    return Slate(np.arange(n), user, rng.standard_normal(d).astype(np.float32), np.full(d, 4.0, np.float32), 3, v,
                 rng.uniform(0.5, 2.0, n), rng.integers(0, 4, n), np.array([1, 2], np.int64),
                 rng.binomial(shown, 0.1), shown, 0.1 * shown + 0.01)


__all__ = ["CHECKS", "full_slate", "replace", "yield_checks"]
