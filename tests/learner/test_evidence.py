"""A promoted model starts the ads' calibration from its own predictions, not from the model before it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from privads.infra.keys import EXPECTED_SCALE
from privads.infra.settings import Settings
from privads.learner import ranking
from privads.learner.cycle import Examples, counts_before, evidence_offsets, predicted_counts, ranker_data, split
from privads.ranker.adcounts import AdCounts, RowCounts
from privads.ranker.artifacts import ModelVersion, load_evidence, save_evidence
from privads.ranker.features import MAX_CONTEXT_TOKENS
from privads.ranker.projector import Projector
from privads.ranker.scoring import AdEvidence
from privads.ranker.updates import logit, sigmoid

D = 8


class Cat:
    def __init__(self, ids: list[str]) -> None:
        self.ad_ids = ids
        self.row = {a: i for i, a in enumerate(ids)}


def examples(seed: int = 0, n: int = 400) -> Examples:
    rng = np.random.default_rng(seed)
    ads = rng.standard_normal((3, D)).astype(np.float32)
    which = rng.integers(0, 3, n)
    return Examples(
        ads=ads[which], users=rng.standard_normal((n, D)).astype(np.float32),
        clicked=(rng.random(n) < 0.2).astype(np.float32), ts=np.arange(n, dtype=np.float64),
        counts=np.full(n, 5), bids=np.ones(n, np.float32), category=np.zeros(n, np.int64),
        context=np.zeros((n, MAX_CONTEXT_TOKENS), np.int64), position=np.zeros(n, np.int64),
        value=np.full(n, np.nan, np.float32), group=np.arange(n), ad_ids=np.array([f"a{i}" for i in which], object),
        event_ids=np.array([f"i{i}" for i in range(n)], object),
        policy=np.where(np.arange(n) % 4 == 0, "control", "treatment").astype(object),
        propensity=np.full(n, np.nan), contexts=np.full(n, None, dtype=object))


def test_the_new_models_evidence_is_its_predictions_on_the_logged_features_plus_what_comes_after() -> None:
    ex, settings = examples(), Settings(seed=0)
    projector = Projector(np.eye(D, dtype=np.float32) * 0.5, np.zeros(D, np.float32))
    # the counts in Redis now: in the old model's terms (its expected clicks are on another scale)
    live = {"treatment": {"a0": [40, 500, 90 * EXPECTED_SCALE], "a1": [10, 300, 5 * EXPECTED_SCALE],
                          "gone": [3, 50, 2 * EXPECTED_SCALE]}}
    offsets = evidence_offsets(ex, projector, None, settings, live)

    p = sigmoid((ex.users * projector.project(ex.ads)).sum(1) + logit(settings.base_rate))
    counts = AdCounts()
    counts.reset(live)
    rc = RowCounts(Cat(["a0", "a1", "a2", "gone"]), "treatment", offsets["treatment"])
    rc.sync(counts)
    for row, ad in enumerate(["a0", "a1", "a2"]):
        mine = (ex.ad_ids == ad) & (ex.policy == "treatment")
        clicks, shown, expected = rc.take(np.array([row]))
        assert clicks[0] == ex.clicked[mine].sum()  # the window's clicks, once
        np.testing.assert_allclose(expected[0], p[mine].sum(), rtol=1e-6)  # predicted by the new model
        assert shown[0] == live["treatment"].get(ad, [0, 0, 0])[1]  # impressions are never offset
    assert rc.take(np.array([3]))[0][0] == 0 and rc.take(np.array([3]))[2][0] == 0  # no logged row: from its prior
    # the control arm gets its own rows' evidence
    assert sum(c for c, _ in offsets["control"].values()) == ex.clicked[ex.policy == "control"].sum()

    # what comes after the promotion adds to it
    before = rc.take(np.array([0]))
    counts.apply({"treatment": {"a0": [2, 10, 3 * EXPECTED_SCALE]}})
    rc.sync(counts)
    after = rc.take(np.array([0]))
    assert after[0][0] == before[0][0] + 2 and after[1][0] == before[1][0] + 10
    np.testing.assert_allclose(after[2][0], before[2][0] + 3.0)
    # the calibration factor is the new model's: its clicks against its own predictions
    ev = AdEvidence(after[0], after[2], 5.0)
    np.testing.assert_allclose(ev.mean(), (5.0 + after[0]) / (5.0 + after[2]))


def test_without_examples_a_new_model_starts_every_ad_from_its_prior(tmp_path: Path) -> None:
    live = {"treatment": {"a0": [40, 500, 90 * EXPECTED_SCALE]}}
    offsets = evidence_offsets(None, Projector(np.eye(D, dtype=np.float32), np.zeros(D, np.float32)), None,
                               Settings(seed=0), live)
    save_evidence(tmp_path, offsets)
    loaded = load_evidence(tmp_path)
    assert loaded == {"treatment": {"a0": (-40.0, -90.0)}}
    counts = AdCounts()
    counts.reset(live)
    rc = RowCounts(Cat(["a0"]), "treatment", loaded["treatment"])
    rc.sync(counts)
    clicks, shown, expected = rc.take(np.array([0]))
    assert (clicks[0], shown[0], expected[0]) == (0, 500, 0.0)
    assert load_evidence(tmp_path / "none") is None


def test_evidence_is_the_same_scored_in_chunks(monkeypatch) -> None:
    import privads.learner.cycle as cycle

    ex, settings = examples(seed=5, n=300), Settings(seed=0)
    projector = Projector(np.eye(D, dtype=np.float32), np.zeros(D, np.float32))
    whole = evidence_offsets(ex, projector, None, settings, {})
    monkeypatch.setattr(cycle, "EVIDENCE_CHUNK", 37)
    chunked = evidence_offsets(ex, projector, None, settings, {})
    assert whole.keys() == chunked.keys()
    for arm in whole:
        assert whole[arm].keys() == chunked[arm].keys()
        for ad in whole[arm]:
            np.testing.assert_allclose(chunked[arm][ad], whole[arm][ad], rtol=1e-9)


def test_the_off_policy_estimates_see_the_evidence_from_before_the_held_out_rows_only() -> None:
    """Today's counts hold the held-out impressions' own clicks; the estimates' counts are rebuilt without them."""
    ex, settings = examples(seed=3, n=500), Settings(seed=0)
    train, hold = split(ex)
    projector = Projector(np.eye(D, dtype=np.float32) * 0.3, np.zeros(D, np.float32))
    version = ModelVersion({}, projector, cast(Any, None))
    counts = counts_before(train, version, settings)
    p = sigmoid((train.users * projector.project(train.ads)).sum(1) + logit(settings.base_rate))
    for arm in ("treatment", "control"):
        for ad in ("a0", "a1", "a2"):
            mine = (train.ad_ids == ad) & (train.policy == arm)
            clicks, shown, expected = counts.get(arm, ad)
            assert (clicks, shown) == (train.clicked[mine].sum(), mine.sum())
            assert abs(expected - p[mine].sum() * EXPECTED_SCALE) <= 1  # the version's own predictions, µ-clicks
    # flipping every held-out label changes nothing the estimates' policies are given
    flipped = Examples(**{**{f: getattr(ex, f) for f in ex.__dataclass_fields__},
                          "clicked": np.r_[train.clicked, 1.0 - hold.clicked].astype(np.float32)})
    again = counts_before(split(flipped)[0], version, settings)
    assert again.of_arm("treatment") == counts.of_arm("treatment")
    # and the rows it reads are all older than every held-out row
    assert train.ts.max() < hold.ts.min()


def test_a_rankers_evidence_is_predicted_as_serving_logs_it_at_the_top_position() -> None:
    """The live counts add the pCTR /recommend logs (the ranker at position 0); a rebuilt base must match it."""
    ex, settings = examples(seed=4, n=300), Settings(seed=0)
    ex = Examples(**{**{f: getattr(ex, f) for f in ex.__dataclass_fields__}, "position": np.arange(300) % 10})
    projector = Projector(np.eye(D, dtype=np.float32) * 0.4, np.zeros(D, np.float32))
    model = ranking.export(ranking.fit(ranker_data(ex, projector), "logistic", epochs=1, seed=0))
    # a steep position effect, so that predicting at the logged positions would be far off
    model = replace(model, position_bias=np.linspace(0.0, -3.0, model.position_bias.shape[0]).astype(np.float32))
    got = predicted_counts(ex, projector, model, settings)
    p = projector.project(ex.ads)
    served = np.array([sigmoid(model.dot_weight * float(ex.users[i] @ p[i]) + model.request_logits(
        ex.users[i], int(ex.counts[i]), p[i:i + 1], ex.bids[i:i + 1], ex.category[i:i + 1], ex.context[i])[0])
        for i in range(len(ex.clicked))])
    for arm in ("treatment", "control"):
        for ad in ("a0", "a1", "a2"):
            mine = (ex.ad_ids == ad) & (ex.policy == arm)
            clicks, shown, expected = got[arm][ad]
            assert (clicks, shown) == (ex.clicked[mine].sum(), mine.sum())
            np.testing.assert_allclose(expected, served[mine].sum(), rtol=1e-4)
