"""The ranker's per-request fast path against the per-row definition the learner trains on."""

from __future__ import annotations

import numpy as np

from privads.bench.synthetic import learned_users, logged_traffic, make_world
from privads.learner import ranking
from privads.ranker.features import candidate_rows, context_ids
from privads.ranker.updates import UpdateParams, logit


def test_request_logits_equal_candidate_logits_of_the_rows() -> None:
    world = make_world(300, 200, d=16, seed=3)
    params = UpdateParams(learning_rate=0.8, max_step=1.0, l2_prior=0.01, bias=logit(0.05))
    users, counts = learned_users(world, 5, params, 1.0, seed=4)
    model = ranking.export(ranking.fit(logged_traffic(world, users, counts, 400, seed=5), "dcn", epochs=1, seed=0))
    rng = np.random.default_rng(6)
    for user, count, context in ((users[0], int(counts[0]), {"device": "mobile", "daypart": 2}),
                                 (np.zeros(16, np.float32), 0, None)):
        cand = rng.choice(world.ads.shape[0], 50, replace=False)
        ads, bids = world.ads[cand], world.bids[cand]
        cats = rng.integers(0, 64, cand.size)
        want = model.candidate_logits(candidate_rows(user, count, ads, bids, cats, context_ids(context)))
        got = model.request_logits(user, count, ads, bids, cats, context_ids(context))
        assert got.shape == (50,) and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert np.ptp(got) > 1e-3  # the candidates are told apart, not a constant
