"""Projector training on synthetic data with a known answer."""

from __future__ import annotations

import numpy as np

from privads.learner.evaluation import auc, log_loss
from privads.learner.train import train_projector
from privads.ranker.projector import Projector, initial_projector
from privads.ranker.updates import logit, sigmoid

D_AD, D_USER, BIAS = 32, 8, logit(0.1)


def world(n: int, seed: int):
    """Users and ads where clicks follow a hidden projector: P(click) = σ(u · norm(x W*) + bias)."""
    rng = np.random.default_rng(seed)
    truth = Projector(rng.standard_normal((D_AD, D_USER)).astype(np.float32), np.zeros(D_USER, np.float32))
    users = 3 * rng.standard_normal((n, D_USER)).astype(np.float32) / np.sqrt(D_USER)
    ads = rng.standard_normal((n, D_AD)).astype(np.float32)
    p = sigmoid((users * truth.project(ads)).sum(1) + BIAS)
    return ads, users, (rng.random(n) < p).astype(np.float32), truth


def score(proj: Projector, ads, users) -> np.ndarray:
    return sigmoid((users * proj.project(ads)).sum(1) + BIAS)


# trained on one half, the projector predicts the other half's clicks far better than the random start
def test_training_learns_the_hidden_projection_on_held_out_data():
    ads, users, y, truth = world(40_000, seed=0)
    init = initial_projector(D_AD, D_USER, seed=1)
    fit = train_projector(ads[:20_000], users[:20_000], y[:20_000], init, bias=BIAS, epochs=8, lr=0.01, anchor=0.0)
    held = slice(20_000, None)
    before = auc(y[held], score(init, ads[held], users[held]))
    after = auc(y[held], score(fit, ads[held], users[held]))
    best = auc(y[held], score(truth, ads[held], users[held]))
    assert before < 0.6 and after > before + 0.15 and after <= best + 0.01
    fit_loss = log_loss(y[held], score(fit, ads[held], users[held]))
    assert fit_loss < log_loss(y[held], score(init, ads[held], users[held]))


# the L2 anchor keeps a warm-started projector near the served one; seeded runs agree exactly
def test_anchor_limits_drift_and_seeded_runs_agree():
    ads, users, y, _ = world(5_000, seed=2)
    init = initial_projector(D_AD, D_USER, seed=3)
    loose = train_projector(ads, users, y, init, bias=BIAS, epochs=3, lr=0.01, anchor=0.0, seed=5)
    tight = train_projector(ads, users, y, init, bias=BIAS, epochs=3, lr=0.01, anchor=10.0, seed=5)
    moved = lambda p: float(np.linalg.norm(p.weight - init.weight))  # noqa: E731
    assert moved(tight) < 0.5 * moved(loose)
    again = train_projector(ads, users, y, init, bias=BIAS, epochs=3, lr=0.01, anchor=0.0, seed=5)
    np.testing.assert_array_equal(again.weight, loose.weight)
