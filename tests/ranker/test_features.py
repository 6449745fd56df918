"""Ranker features: one definition for training and serving."""

from __future__ import annotations

import numpy as np

from privads.ranker.features import (
    CONTEXT_BUCKETS,
    MAX_CONTEXT_TOKENS,
    MAX_POSITION,
    build_rows,
    candidate_rows,
    category_id,
    context_ids,
    dense_width,
)


def test_dense_layout_is_interaction_user_ad_dot_reserved_count() -> None:
    u = np.array([[1.0, 2.0]], np.float32)
    p = np.array([[0.5, -1.0]], np.float32)
    rows = build_rows(u, np.array([3]), p, np.array([2.0]), np.array([5]), context_ids({"a": "b"})[None, :],
                      np.array([1]))
    assert rows.dense.shape == (1, dense_width(2)) == (1, 9)
    np.testing.assert_allclose(rows.dense[0], [0.5, -2.0, 1.0, 2.0, 0.5, -1.0, -1.5, 0.0, np.log(4.0)],
                               rtol=1e-6)
    # the click model never sees the bid: another bid, the same features
    other = build_rows(u, np.array([3]), p, np.array([50.0]), np.array([5]), context_ids({"a": "b"})[None, :],
                       np.array([1]))
    np.testing.assert_array_equal(other.dense, rows.dense)
    assert rows.dot[0] == np.float32(-1.5)
    assert rows.category[0] == 5 and rows.position[0] == 1


def test_positions_are_capped() -> None:
    rows = build_rows(np.zeros((1, 2)), np.zeros(1), np.zeros((1, 2)), np.ones(1), np.zeros(1, int),
                      np.full((1, MAX_CONTEXT_TOKENS), CONTEXT_BUCKETS), np.array([500]))
    assert rows.position[0] == MAX_POSITION - 1


def test_context_ids_are_stable_sorted_and_skip_what_cannot_be_tokenised() -> None:
    a = context_ids({"device": "mobile", "hour": 7, "score": 0.3, "tags": ["x"], "ok": True})
    b = context_ids({"ok": True, "hour": 7, "device": "mobile"})
    np.testing.assert_array_equal(a, b)  # key order does not matter; float/list values are dropped
    assert (a < CONTEXT_BUCKETS).sum() == 3 and (a[3:] == CONTEXT_BUCKETS).all()
    assert (context_ids(None) == CONTEXT_BUCKETS).all()
    assert not np.array_equal(context_ids({"device": "mobile"}), context_ids({"device": "desktop"}))


def test_category_ids() -> None:
    assert category_id(None) == 0
    assert category_id("travel") == category_id("travel") != 0


def test_candidate_rows_equal_per_row_features_at_the_top_position() -> None:
    rng = np.random.default_rng(0)
    u, ads, bids = rng.standard_normal(4), rng.standard_normal((6, 4)), rng.random(6) + 0.1
    cats, ctx = rng.integers(0, 10, 6), context_ids({"device": "tablet"})
    c = candidate_rows(u, 9, ads, bids, cats, ctx)
    r = build_rows(np.tile(u, (6, 1)), np.full(6, 9), ads, bids, cats, np.tile(ctx, (6, 1)), np.zeros(6, int))
    np.testing.assert_array_equal(c.dense, r.dense)
    np.testing.assert_array_equal(c.context, r.context)
    assert (c.position == 0).all()
