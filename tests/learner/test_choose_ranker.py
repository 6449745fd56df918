"""The ranker stage of a learner cycle: promoted when better than what is served, rejected when worse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from privads.bench.synthetic import learned_users, logged_traffic, make_world
from privads.infra.settings import Settings
from privads.learner import ranking
from privads.learner.cycle import Examples, choose_ranker
from privads.ranker.projector import Projector
from privads.ranker.updates import UpdateParams, logit

D = 16


@pytest.fixture(scope="module")
def examples() -> Examples:
    """Simulated logged traffic as the cycle loads it (the identity projector keeps the ad vectors)."""
    world = make_world(3000, 800, d=D, seed=11)
    params = UpdateParams(learning_rate=0.8, max_step=1.0, l2_prior=0.01, bias=logit(0.05))
    users, counts = learned_users(world, 20, params, 16.0, seed=12)
    t = logged_traffic(world, users, counts, 10_000, seed=13)
    r = t.rows
    n = len(t)
    _, ad_index = np.unique(r.dense[:, 2 * D:3 * D], axis=0, return_inverse=True)
    return Examples(ads=r.dense[:, 2 * D:3 * D].copy(), users=r.dense[:, D:2 * D].copy(), clicked=t.clicked,
                    ts=np.arange(n, dtype=np.float64), counts=np.expm1(r.dense[:, 3 * D + 2]).round().astype(int),
                    bids=np.exp(r.dense[:, 3 * D + 1]), category=r.category, context=r.context, position=r.position,
                    value=t.value, group=t.group, ad_ids=np.array([f"a{i}" for i in ad_index.ravel()], dtype=object),
                    event_ids=np.array([f"i{i}" for i in range(n)], dtype=object),
                    policy=np.full(n, "treatment", dtype=object), propensity=np.full(n, np.nan),
                    contexts=np.full(n, None, dtype=object))


IDENTITY = Projector(np.eye(D, dtype=np.float32), np.zeros(D, np.float32))


def test_a_trained_ranker_replaces_the_stream_formula_and_reports_baselines(examples: Examples) -> None:
    model, info = choose_ranker(None, examples, IDENTITY, Settings(seed=0))
    assert info["promoted"] and model is not None, info
    # as served (top position, times the ads' factors from the training rows), better than σ(u·p + b) × factor:
    # this world's context × category effect is one no per-ad factor holds
    assert info["candidate"]["auc"] > info["served"]["auc"] + 0.01, info
    raw = info["uncalibrated"]
    assert raw["candidate"]["auc"] > raw["served"]["auc"] + 0.02, info  # better than σ(u·p + b)
    assert raw["candidate"]["auc"] >= info["baselines"]["popularity"]["auc"], info
    assert raw["candidate"]["auc"] >= info["baselines"]["logistic"]["auc"], info
    assert 0 < info["candidate"]["ndcg_at_10"] <= 1


def test_the_gate_judges_the_served_policy_with_its_ads_factors(examples: Examples) -> None:
    """Where clicks depend on the ad alone, the factors serving multiplies in already know it: the gate sees them."""
    rng = np.random.default_rng(3)
    ads, which = np.unique(examples.ad_ids.astype(str), return_inverse=True)
    ctr = np.minimum(np.exp(rng.normal(np.log(0.05), 1.0, ads.size)), 0.9)
    clicked = (rng.random(len(which)) < ctr[which.ravel()]).astype(np.float32)
    ad_only = Examples(**{**{f: getattr(examples, f) for f in examples.__dataclass_fields__}, "clicked": clicked})
    _, info = choose_ranker(None, ad_only, IDENTITY, Settings(seed=0))
    # σ(u·p + b) alone knows nothing of these ads; times each ad's factor from the training rows it ranks them
    assert info["served"]["auc"] > info["uncalibrated"]["served"]["auc"] + 0.1, info
    assert info["served"]["auc"] > 0.6, info


def test_a_worse_candidate_ranker_is_rejected_and_the_served_one_kept(examples: Examples) -> None:
    served, _ = choose_ranker(None, examples, IDENTITY, Settings(seed=0))

    def shuffled(data: ranking.LabelledRows, kind: str, **kw: Any) -> ranking.Fitted:  # learns noise; kw: fit's options
        rng = np.random.default_rng(0)
        noise = ranking.LabelledRows(data.rows, rng.permutation(data.clicked), data.value, data.group)
        return ranking.fit(noise, kind, **{**kw, "init": None})

    kept, info = choose_ranker(served, examples, IDENTITY, Settings(seed=0), fitter=shuffled)
    assert info["trained"] and not info["promoted"] and "AUC" in info["reason"], info
    assert kept is served


def test_too_few_examples_train_nothing(examples: Examples) -> None:
    model, info = choose_ranker(None, examples.take(slice(0, 50)), IDENTITY, Settings(seed=0))
    assert model is None and not info["trained"] and "fewer than" in info["reason"]
