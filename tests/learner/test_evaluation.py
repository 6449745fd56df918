"""Offline metrics and the promotion gate against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privads.learner.evaluation import Scores, auc, auc_difference, gate, log_loss, ndcg_at_k


# y = [0,0,1,1], s = [.1,.4,.35,.8]: pairs (pos, neg) correctly ordered: (.35>.1), (.8>.1), (.8>.4) = 3 of 4
def test_auc_hand_computed():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


# a tie between a positive and a negative counts half: pairs (.5 vs .5) = 0.5, (.5 > .2) = 1 → 1.5 / 2
def test_auc_counts_ties_half():
    assert auc(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.2])) == pytest.approx(0.75)
    assert auc(np.array([1, 0]), np.array([0.3, 0.3])) == pytest.approx(0.5)
    assert math.isnan(auc(np.array([1, 1]), np.array([0.3, 0.9])))


# agrees with the pairwise definition on random data (an independent formula)
def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 2)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(y, s) == pytest.approx(pairwise)


# −(ln .9 + ln .8)/2 = (0.1053605 + 0.2231436)/2 = 0.1642520
def test_log_loss_hand_computed_and_clipped():
    assert log_loss(np.array([1, 0]), np.array([0.9, 0.2])) == pytest.approx(0.1642520, abs=1e-6)
    assert np.isfinite(log_loss(np.array([1]), np.array([0.0])))  # clipped, not infinite


# request a: positive ranked 2nd of 3 → DCG 1/log2(3) = 0.6309, IDCG 1 → 0.6309; request b: perfect → 1
def test_ndcg_hand_computed():
    groups = np.array(["a", "a", "a", "b", "b", "c"])
    y = np.array([0, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.5, 0.1, 0.7, 0.2, 0.3])
    assert ndcg_at_k(groups, y, s, k=10) == pytest.approx((1 / np.log2(3) + 1.0) / 2)  # c has no positive


def test_gate_rejects_a_worse_candidate_with_its_reason():
    served = Scores(auc=0.70, log_loss=0.20)
    assert gate(Scores(0.72, 0.19), served).promote
    assert gate(Scores(0.699, 0.2005), served).promote  # within the noise tolerances
    worse_auc = gate(Scores(0.65, 0.19), served)
    assert not worse_auc.promote and "AUC 0.6500 < served 0.7000" in worse_auc.reason
    worse_loss = gate(Scores(0.71, 0.25), served)
    assert not worse_loss.promote and "log-loss" in worse_loss.reason
    assert gate(Scores(0.6, 0.3), None).promote
    assert not gate(Scores(float("nan"), 0.3), served).promote


def test_ndcg_matches_a_per_group_loop_with_ties() -> None:
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, 600)
    y = (rng.random(600) < 0.2).astype(float)
    s = rng.integers(0, 5, 600).astype(float)  # many ties: they keep row order
    discounts = 1.0 / np.log2(np.arange(2, 12))
    values = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rel = y[idx]
        if rel.sum() == 0:
            continue
        ranked = rel[np.argsort(-s[idx], kind="stable")][:10]
        ideal = np.sort(rel)[::-1][:10]
        values.append((ranked * discounts[:len(ranked)]).sum() / (ideal * discounts[:len(ideal)]).sum())
    assert ndcg_at_k(groups, y, s, k=10) == pytest.approx(np.mean(values), abs=1e-12)


def _psi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann–Whitney kernel, shape (len(x), len(y)): 1 where x > y, ½ on ties."""
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def test_auc_difference_is_delongs_paired_estimate_computed_by_brute_force() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(np.float32)
    a = y * 0.8 + rng.normal(size=300)
    b = np.round(y * 0.5 + rng.normal(size=300), 1)  # with ties
    diff, se = auc_difference(y, a, b)
    pos, neg = y > 0.5, y < 0.5
    comps = []
    for s in (a, b):
        k = _psi(s[pos], s[neg])
        comps.append((k.mean(), k.mean(axis=1), k.mean(axis=0)))
    assert diff == pytest.approx(comps[0][0] - comps[1][0], abs=1e-12)
    assert comps[0][0] == pytest.approx(auc(y, a), abs=1e-12)
    v10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    v01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    var = (v10[0, 0] + v10[1, 1] - 2 * v10[0, 1]) / pos.sum() + (v01[0, 0] + v01[1, 1] - 2 * v01[0, 1]) / neg.sum()
    assert se == pytest.approx(np.sqrt(var), rel=1e-9)
    assert auc_difference(y, a, a) == (0.0, 0.0)  # a model against itself: no gain, no noise
    assert all(np.isnan(auc_difference(np.zeros(5), a[:5], b[:5])))


def test_the_gate_asks_a_gain_beyond_the_holdouts_noise_when_it_knows_it() -> None:
    served = Scores(0.70, 0.20)
    assert gate(Scores(0.707, 0.20), served).promote  # not worse: promoted without a standard error
    noisy = gate(Scores(0.707, 0.20), served, auc_se=0.01)
    assert not noisy.promote and "noise" in noisy.reason
    assert gate(Scores(0.72, 0.20), served, auc_se=0.01).promote  # 2 SE
    assert gate(Scores(0.6, 0.3), None, auc_se=0.5).promote  # nothing served: nothing to keep
