"""Ranker training: export to the numpy serving form, warm start, seeds, and that it beats the baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privads.bench.synthetic import learned_users, logged_traffic, make_world
from privads.learner import ranking
from privads.learner.evaluation import auc
from privads.ranker.model import RankerModel
from privads.ranker.updates import UpdateParams, logit

PARAMS = UpdateParams(learning_rate=0.8, max_step=1.0, l2_prior=0.01, bias=logit(0.05))


@pytest.fixture(scope="module")
def traffic() -> ranking.LabelledRows:
    world = make_world(3000, 800, d=16, seed=1)
    users, counts = learned_users(world, 20, PARAMS, 16.0, seed=2)
    return logged_traffic(world, users, counts, 12_000, seed=3)


@pytest.mark.parametrize("kind", ["dcn", "logistic"])
def test_numpy_serving_form_matches_torch(traffic: ranking.LabelledRows, kind: str, tmp_path: Path) -> None:
    fitted = ranking.fit(traffic.take(slice(0, 5000)), kind, epochs=1, seed=0)
    rows = traffic.rows.take(np.arange(5000, 6000))
    model = ranking.export(fitted)
    model.save(tmp_path / "r.npz")
    loaded = RankerModel.load(tmp_path / "r.npz")
    torch_logits = ranking.predict_logits(fitted, rows)
    np.testing.assert_allclose(loaded.click_logits(rows), torch_logits, atol=1e-4)
    # serving splits the logit: h(x) at the top slot, plus a · u·p (the part Thompson sampling redraws)
    top = rows.take(np.flatnonzero(rows.position == 0))
    np.testing.assert_allclose(loaded.candidate_logits(top) + loaded.dot_weight * top.dot,
                               loaded.click_logits(top), atol=1e-4)
    assert (loaded.values(rows) >= 0).all()


def test_logistic_has_no_hidden_layers_and_dcn_has_cross_layers(traffic: ranking.LabelledRows) -> None:
    small = traffic.take(slice(0, 2000))
    lr = ranking.export(ranking.fit(small, "logistic", epochs=1))
    dcn = ranking.export(ranking.fit(small, "dcn", epochs=1))
    assert lr.describe()["cross_layers"] == 0 and lr.describe()["hidden"] == []
    assert dcn.describe()["cross_layers"] == 2 and dcn.describe()["hidden"] == list(ranking.DCN_HIDDEN)
    assert dcn.cross_u[0].shape[1] == ranking.DCN_RANK


def test_two_seeded_fits_agree_and_other_seeds_differ(traffic: ranking.LabelledRows) -> None:
    small = traffic.take(slice(0, 3000))
    rows = traffic.rows.take(np.arange(3000, 3500))
    a = ranking.export(ranking.fit(small, "dcn", epochs=1, seed=5)).click_logits(rows)
    b = ranking.export(ranking.fit(small, "dcn", epochs=1, seed=5)).click_logits(rows)
    c = ranking.export(ranking.fit(small, "dcn", epochs=1, seed=6)).click_logits(rows)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_warm_start_begins_from_the_served_weights(traffic: ranking.LabelledRows) -> None:
    small = traffic.take(slice(0, 3000))
    served = ranking.export(ranking.fit(small, "dcn", epochs=2, seed=0))
    module = ranking.make_module("dcn", small.rows.dense.shape[1], served.mean, served.std, seed=1)
    ranking._load_numpy(module, served)
    rows = traffic.rows.take(np.arange(3000, 3500))
    copied = ranking.predict_logits(ranking.Fitted(module.eval(), "dcn", 0, 0.0), rows)
    np.testing.assert_allclose(copied, served.click_logits(rows), atol=1e-4)


def test_a_served_ranker_of_another_size_is_not_warm_started_from(traffic: ranking.LabelledRows) -> None:
    small = traffic.take(slice(0, 2000))
    served = ranking.export(ranking.fit(small, "dcn", epochs=1, seed=0, dcn_size=(16, ranking.DCN_HIDDEN)))
    assert served.cross_u[0].shape[1] == 16
    fitted = ranking.export(ranking.fit(small, "dcn", epochs=1, seed=0, init=served))  # trains from scratch
    assert fitted.cross_u[0].shape[1] == ranking.DCN_RANK


def test_unknown_kind_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        ranking.make_module("gbdt", 9, np.zeros(9, np.float32), np.ones(9, np.float32), 0)


def test_dcn_beats_logistic_regression_on_held_out_traffic(traffic: ranking.LabelledRows) -> None:
    # the simulated clicks depend on category × context interactions and a multi-interest maximum:
    # what the cross layers can learn and a linear model cannot
    cut = int(len(traffic) * 0.8)
    train, hold = traffic.take(slice(0, cut)), traffic.take(slice(cut, None))
    scores = {kind: auc(hold.clicked, ranking.predict_logits(ranking.fit(train, kind, epochs=3), hold.rows))
              for kind in ("dcn", "logistic")}
    # seeded, so exact: +0.0093 here (it was +0.015 while the bid was a feature, which in logged traffic says how
    # an ad won its slot, not whether it is clicked; `privads bench learn`, on 480,000 rows, has the margin at +0.03)
    assert scores["dcn"] > scores["logistic"] + 0.005, scores
    assert scores["logistic"] > 0.6, scores  # both learned something
