"""Unit tests for the serving catalog and its FAISS index (``ranker.index``)."""

from __future__ import annotations

import numpy as np

from privads.ranker.index import ServingCatalog


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _add(cat: ServingCatalog, ids, vectors, bids=None, active=None, cats=None) -> None:
    n = len(ids)
    cat.upsert(list(ids), np.asarray(vectors, np.float32),
               np.asarray(bids if bids is not None else np.ones(n), np.float32),
               np.asarray(active if active is not None else np.ones(n, bool), bool),
               list(cats) if cats is not None else [None] * n)


def _exact(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
    """Exact inner-product top-n over ``rows`` by numpy (float64)."""
    s = vectors[rows].astype(np.float64) @ q.astype(np.float64)
    return rows[np.argsort(-s, kind="stable")[:n]]


def test_empty_catalog():
    cat = ServingCatalog(4)
    assert len(cat) == 0 and cat.index_type == "Flat"
    assert cat.search(np.ones(4, np.float32), 5).size == 0
    assert cat.active_rows().size == 0


def test_upsert_assigns_dense_rows_and_stores_fields():
    cat = ServingCatalog(2)
    _add(cat, ["a", "b", "c"], [[1, 0], [0, 1], [0.6, 0.8]], bids=[1.0, 2.0, 3.0], cats=["x", None, "z"])
    assert len(cat) == 3
    assert cat.ad_ids == ["a", "b", "c"] and cat.row == {"a": 0, "b": 1, "c": 2}
    np.testing.assert_array_equal(cat.bids[:3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(cat.vectors[2], [0.6, 0.8])
    assert cat.categories == ["x", None, "z"]
    np.testing.assert_array_equal(cat.active_rows(), [0, 1, 2])
    # query (1, 0): inner products a = 1, c = 0.6, b = 0
    np.testing.assert_array_equal(cat.search(np.array([1, 0], np.float32), 3), [0, 2, 1])


def test_replace_keeps_row_and_updates_vector_bid_category():
    cat = ServingCatalog(2)
    _add(cat, ["a", "b", "c"], [[1, 0], [0, 1], [0.6, 0.8]], bids=[1.0, 2.0, 3.0], cats=["x", "y", "z"])
    q = np.array([1, 0], np.float32)
    assert cat.search(q, 3).tolist() == [0, 2, 1]  # a·q = 1, c·q = 0.6, b·q = 0
    _add(cat, ["a"], [[-1, 0]], bids=[5.0], cats=["new"])
    assert len(cat) == 3 and cat.row["a"] == 0 and cat.ad_ids == ["a", "b", "c"]
    np.testing.assert_allclose(cat.vectors[0], [-1, 0])
    assert cat.bids[0] == 5.0 and cat.categories == ["new", "y", "z"]
    # the old vector left the index and the new one is in it: now a·q = −1 ranks last
    assert cat.search(q, 3).tolist() == [2, 1, 0]


def test_deactivate_and_reactivate():
    cat = ServingCatalog(2)
    _add(cat, ["a", "b", "c"], [[1, 0], [0, 1], [0.6, 0.8]])
    _add(cat, ["a"], [[1, 0]], active=[False])
    assert len(cat) == 2
    np.testing.assert_array_equal(cat.active_rows(), [1, 2])
    # even the query equal to a's vector never returns a
    assert 0 not in cat.search(np.array([1, 0], np.float32), 10).tolist()
    # deactivating an inactive ad is a no-op
    _add(cat, ["a"], [[1, 0]], active=[False])
    assert len(cat) == 2
    _add(cat, ["a"], [[1, 0]], active=[True])
    assert len(cat) == 3
    assert cat.search(np.array([1, 0], np.float32), 1).tolist() == [0]


def test_new_inactive_ad_is_registered_but_not_indexed():
    cat = ServingCatalog(2)
    _add(cat, ["a", "b"], [[1, 0], [0, 1]], active=[False, True])
    assert len(cat) == 1 and cat.row == {"a": 0, "b": 1}
    assert cat.search(np.array([1, 0], np.float32), 5).tolist() == [1]


def test_search_matches_exact_numpy_inner_product():
    rng = np.random.default_rng(1234)
    d, n_ads = 16, 300
    vec = _unit_rows(rng, n_ads, d)
    cat = ServingCatalog(d)
    _add(cat, [f"ad{i}" for i in range(n_ads)], vec)
    for _ in range(40):
        q = _unit_rows(rng, 1, d)[0]
        scores = np.sort(vec.astype(np.float64) @ q)[::-1][:21]
        assert np.min(-np.diff(scores)) > 1e-6  # precondition: no near-ties that float32 could swap
        for n in (1, 5, 20):
            np.testing.assert_array_equal(cat.search(q, n), _exact(vec, np.arange(n_ads), q, n))


def test_search_with_inactive_ads_matches_exact_over_active_rows():
    rng = np.random.default_rng(77)
    d, n_ads = 8, 120
    vec = _unit_rows(rng, n_ads, d)
    active = rng.random(n_ads) < 0.5
    cat = ServingCatalog(d)
    _add(cat, [f"ad{i}" for i in range(n_ads)], vec, active=active)
    # deactivate a few more afterwards and replace some active vectors
    off = np.flatnonzero(active)[:5]
    _add(cat, [f"ad{i}" for i in off], vec[off], active=np.zeros(5, bool))
    active[off] = False
    moved = np.flatnonzero(active)[:5]
    vec[moved] = _unit_rows(rng, 5, d)
    _add(cat, [f"ad{i}" for i in moved], vec[moved])
    rows = np.flatnonzero(active)
    assert len(cat) == rows.size
    np.testing.assert_array_equal(cat.active_rows(), rows)
    for _ in range(30):
        q = _unit_rows(rng, 1, d)[0]
        got = cat.search(q, 10)
        assert set(got.tolist()) <= set(rows.tolist())
        np.testing.assert_array_equal(got, _exact(vec, rows, q, 10))
    # asking for more than there are returns all active rows, once each
    got = cat.search(_unit_rows(rng, 1, d)[0], 10_000)
    assert sorted(got.tolist()) == rows.tolist()


def test_growth_beyond_initial_capacity_preserves_rows():
    rng = np.random.default_rng(5)
    d = 4
    v1, v2 = _unit_rows(rng, 1000, d), _unit_rows(rng, 600, d)
    cat = ServingCatalog(d)
    _add(cat, [f"a{i}" for i in range(1000)], v1, bids=np.arange(1000))
    _add(cat, [f"b{i}" for i in range(600)], v2, bids=np.arange(600) + 1000)
    assert len(cat) == 1600 and len(cat.ad_ids) == 1600
    np.testing.assert_array_equal(cat.vectors[:1000], v1)
    np.testing.assert_array_equal(cat.vectors[1000:1600], v2)
    np.testing.assert_array_equal(cat.bids[:1600], np.arange(1600))
    q = v1[17]
    assert cat.search(q, 1).tolist() == [17]


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    d, n_ads = 6, 50
    vec = _unit_rows(rng, n_ads, d)
    active = np.ones(n_ads, bool)
    active[::7] = False
    cats = [None if i % 3 == 0 else f"c{i % 4}" for i in range(n_ads)]
    cat = ServingCatalog(d)
    _add(cat, [f"ad{i}" for i in range(n_ads)], vec, bids=rng.uniform(0, 2, n_ads), active=active, cats=cats)
    cat.save(tmp_path)
    back = ServingCatalog.load(tmp_path, d)
    assert back.ad_ids == cat.ad_ids and back.row == cat.row and back.categories == cats
    assert len(back) == len(cat) == int(active.sum())
    np.testing.assert_array_equal(back.vectors[:n_ads], cat.vectors[:n_ads])
    np.testing.assert_array_equal(back.bids[:n_ads], cat.bids[:n_ads])
    np.testing.assert_array_equal(back.active_rows(), np.flatnonzero(active))
    for _ in range(10):
        q = _unit_rows(rng, 1, d)[0]
        np.testing.assert_array_equal(back.search(q, 8), cat.search(q, 8))


def test_save_load_empty(tmp_path):
    ServingCatalog(3).save(tmp_path)
    back = ServingCatalog.load(tmp_path, 3)
    assert len(back) == 0 and back.ad_ids == []


# the same ad twice in one batch: indexed once, the last occurrence wins
def test_duplicate_ad_id_in_one_batch_is_indexed_once():
    cat = ServingCatalog(2)
    _add(cat, ["a", "a"], [[1, 0], [0, 1]], bids=[1.0, 2.0])
    assert len(cat) == 1
    assert cat.search(np.array([0, 1], np.float32), 5).tolist() == [0]
    assert cat.bids[0] == 2.0 and cat.vectors[0].tolist() == [0.0, 1.0]


def _random_catalog(n: int, d: int, low: float, high: float, seed: int):
    """A catalog of n random unit ad vectors with uniform bids in [low, high)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    bids = rng.uniform(low, high, n).astype(np.float32)
    cat = ServingCatalog(d)
    _add(cat, [f"a{i}" for i in range(n)], vecs, bids=bids)
    return cat, vecs, bids


# expected-value retrieval: a cold user (zero vector) gets the highest bids, not the lowest row ids
def test_retrieve_for_a_cold_user_ranks_by_bid():
    cat, _, bids = _random_catalog(50, 4, 0.1, 5.0, seed=3)
    got = cat.retrieve(np.zeros(4, np.float32), 10)
    assert set(got.tolist()) == set(np.argsort(-bids)[:10].tolist())


# for a warm user, retrieval orders by u·p + log(bid): the log of σ(z)·bid at small CTRs
def test_retrieve_orders_by_similarity_plus_log_bid():
    cat, vecs, bids = _random_catalog(60, 8, 0.2, 3.0, seed=4)
    u = 3 * vecs[7]
    expected = np.argsort(-(vecs @ u + np.log(bids)))[:5]
    assert cat.retrieve(u, 5).tolist() == expected.tolist()


# above the exact threshold the index is IVF, tuned at build time to the recall target against exact search
def test_large_catalogs_get_an_ivf_index_that_meets_its_recall_target(tmp_path):
    from privads.ranker.index import build_index, fit_width, probe_queries, recall_at_k

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((50, 16)).astype(np.float32)
    vecs = centres[rng.integers(0, 50, 20_000)] + 0.3 * rng.standard_normal((20_000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    bids = np.exp(rng.normal(0, 0.5, 20_000)).astype(np.float32)
    cat = ServingCatalog.build(16, [f"a{i}" for i in range(20_000)], vecs, bids, np.ones(20_000, bool),
                               [None] * 20_000, exact_below=5_000, k=100, target_recall=0.95)
    assert cat.index_type == "IVF-SQfp16" and cat.info.nlist and cat.info.recall_at_k >= 0.95
    # an independent check of the recall the build reported
    from privads.ranker.scoring import retrieval_keys

    keys = retrieval_keys(vecs, bids)
    width = cat.index.d  # zero padding to a multiple of 8 changes no inner product
    assert width % 8 == 0 and width >= keys.shape[1]
    exact, _ = build_index(fit_width(keys, width), np.arange(20_000, dtype=np.int64), exact_below=10**9)
    queries = fit_width(probe_queries(keys, 100, np.random.default_rng(99)), width)
    assert recall_at_k(cat.index, exact, queries, 100) >= 0.93
    # saved and loaded as built, not retrained; upserts still work on it
    cat.save(tmp_path)
    back = ServingCatalog.load(tmp_path, 16)
    assert back.index_type == "IVF-SQfp16" and back.info == cat.info and len(back) == 20_000
    assert back.index.nprobe == cat.info.nprobe  # the tuned nprobe travels with the index file
    _add(back, ["a0"], [vecs[0]], bids=[1.0], active=[False])
    assert len(back) == 19_999 and 0 not in back.retrieve(vecs[0] * 3, 100).tolist()


# nprobe is tuned on the queries that will be served when a sample of users is given
def test_ivf_nprobe_is_tuned_on_served_users_when_given():
    from privads.ranker.index import build_index, fit_width, recall_at_k, user_queries
    from privads.ranker.scoring import retrieval_keys

    rng = np.random.default_rng(8)
    centres = rng.standard_normal((50, 16)).astype(np.float32)
    vecs = centres[rng.integers(0, 50, 20_000)] + 0.3 * rng.standard_normal((20_000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    bids = np.exp(rng.normal(0, 0.5, 20_000)).astype(np.float32)
    keys = retrieval_keys(vecs, bids)
    ids = np.arange(20_000, dtype=np.int64)
    # young users: small vectors near a few interests (the bid matters as much as the match)
    users = 0.4 * vecs[rng.integers(0, 20_000, 600)] + 0.05 * rng.standard_normal((600, 16)).astype(np.float32)
    synthetic, s_info = build_index(keys, ids, exact_below=5_000, k=100)
    served, u_info = build_index(keys, ids, exact_below=5_000, k=100, users=users)
    assert s_info.tuned_on == "synthetic" and u_info.tuned_on == "users"
    assert u_info.recall_at_k >= 0.95
    # an independent check on users the builds never saw: these users are harder than the synthetic queries,
    # so only the index tuned on them meets the target
    exact, _ = build_index(fit_width(keys, served.d), ids, exact_below=10**9)
    fresh = fit_width(user_queries(
        0.4 * vecs[rng.integers(0, 20_000, 200)] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)), served.d)
    assert recall_at_k(served, exact, fresh, 100) >= 0.95 > recall_at_k(synthetic, exact, fresh, 100)
    assert u_info.nprobe > s_info.nprobe
    # too few users to tune on: the synthetic queries decide
    _, few = build_index(keys, ids, exact_below=5_000, k=100, users=users[:10])
    assert few.tuned_on == "synthetic"
