"""Unit tests for the projector (``ranker.projector``) and versioned artifacts (``ranker.artifacts``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from privads.ranker.artifacts import MANIFEST, collect_garbage, load_version, write_version
from privads.ranker.index import ServingCatalog
from privads.ranker.projector import Projector, initial_projector

# --- projector --------------------------------------------------------------------------


@pytest.mark.parametrize(("d_ad", "d_user"), [(384, 64), (10, 10), (5, 2)])
def test_initial_projector_has_orthonormal_columns(d_ad, d_user):
    p = initial_projector(d_ad, d_user, seed=0)
    assert p.weight.shape == (d_ad, d_user) and p.weight.dtype == np.float32
    assert p.d_user == d_user
    gram = p.weight.astype(np.float64).T @ p.weight.astype(np.float64)
    np.testing.assert_allclose(gram, np.eye(d_user), atol=1e-5)
    np.testing.assert_array_equal(p.bias, np.zeros(d_user))


def test_initial_projector_is_deterministic_per_seed():
    a, b, c = initial_projector(384, 64, 7), initial_projector(384, 64, 7), initial_projector(384, 64, 8)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert not np.allclose(a.weight, c.weight)


def test_orthonormal_projection_preserves_inner_products_in_its_span():
    # x = W·c lies in the column span: x W = c, so inner products of such points are preserved
    p = initial_projector(50, 8, 3)
    rng = np.random.default_rng(0)
    c = rng.standard_normal((4, 8))
    x = c @ p.weight.T.astype(np.float64)
    np.testing.assert_allclose(x @ p.weight.astype(np.float64), c, atol=1e-5)


def _topics(n_per: int, topics: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings sharing one large common direction, plus a direction per topic and noise (MiniLM-like)."""
    rng = np.random.default_rng(seed)
    common, directions = rng.standard_normal(d), rng.standard_normal((topics, d))
    label = np.repeat(np.arange(topics), n_per)
    x = 3.0 * common + 1.5 * directions[label] + rng.standard_normal((label.size, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), label


def _cosines(v: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    c, same = u @ u.T, label[:, None] == label[None, :]
    return float(c[same & ~np.eye(label.size, dtype=bool)].mean()), float(c[~same].mean())


def test_catalog_fit_removes_the_common_direction_and_keeps_the_topics():
    x, label = _topics(30, 8, 96, seed=0)
    fitted = initial_projector(96, 16, 0, x)
    gram = fitted.weight.astype(np.float64).T @ fitted.weight.astype(np.float64)
    np.testing.assert_allclose(gram, np.eye(16), atol=1e-5)
    # the catalog's mean maps to the origin: the bias is −mean·W
    np.testing.assert_allclose(x.mean(axis=0) @ fitted.weight + fitted.bias, 0.0, atol=1e-5)
    within, across = _cosines(fitted.project(x), label)
    raw_within, raw_across = _cosines(initial_projector(96, 16, 0).project(x), label)
    assert raw_across > 0.5  # the common direction dominates a random projection
    # centred, 8 equal topics have mean cross-topic cosine ≈ −within/7: nothing shared is left
    assert within > 0.5 and across < 0.0 and within - across > 2 * (raw_within - raw_across)
    # ads of the catalog's topics that arrive later are separated as well
    later, later_label = _topics(5, 8, 96, seed=0)
    assert _cosines(fitted.project(later), later_label)[1] < 0.0


def test_catalog_fit_is_deterministic_and_completed_when_the_catalog_is_small():
    x, _ = _topics(2, 3, 40, seed=1)  # 6 ads span 5 centred directions: 11 come from the seed
    a, b = initial_projector(40, 16, 4, x), initial_projector(40, 16, 4, x)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    gram = a.weight.astype(np.float64).T @ a.weight.astype(np.float64)
    np.testing.assert_allclose(gram, np.eye(16), atol=1e-5)
    # the fitted directions hold all of the centred catalog's variance
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(np.linalg.norm(centred @ a.weight[:, :5]), np.linalg.norm(centred), rtol=1e-4)
    # one ad (or none) is no catalog to fit: the seeded random map
    np.testing.assert_array_equal(initial_projector(40, 16, 4, x[:1]).weight, initial_projector(40, 16, 4).weight)


def test_catalog_fit_subsamples_large_catalogs_by_the_seed():
    x, label = _topics(200, 4, 32, seed=2)
    a, b = initial_projector(32, 8, 0, x, sample=300), initial_projector(32, 8, 0, x, sample=300)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert not np.array_equal(a.weight, initial_projector(32, 8, 1, x, sample=300).weight)
    np.testing.assert_allclose(_cosines(a.project(x), label), _cosines(initial_projector(32, 8, 0, x).project(x),
                                                                       label), atol=0.05)


def test_project_returns_unit_rows_equal_to_normalised_affine_map():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    p = Projector(weight=w, bias=b)
    x = rng.standard_normal((30, 12))  # float64 input is accepted and cast
    out = p.project(x)
    assert out.shape == (30, 5) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    y = x.astype(np.float32) @ w + b
    np.testing.assert_allclose(out, y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-6)


def test_project_zero_vector_is_finite():
    p = initial_projector(6, 3, 0)  # zero bias: a zero input maps to zero, not NaN
    out = p.project(np.zeros((2, 6), np.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, np.zeros((2, 3)))


def test_projector_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    p = Projector(weight=rng.standard_normal((9, 4)).astype(np.float32), bias=rng.standard_normal(4).astype(np.float32))
    path = tmp_path / "projector.npz"
    p.save(path)
    back = Projector.load(path)
    np.testing.assert_array_equal(back.weight, p.weight)
    np.testing.assert_array_equal(back.bias, p.bias)
    assert back.weight.dtype == np.float32 and back.bias.dtype == np.float32
    x = rng.standard_normal((3, 9)).astype(np.float32)
    np.testing.assert_array_equal(back.project(x), p.project(x))


# --- artifacts --------------------------------------------------------------------------


def _catalog(projector: Projector, n: int = 20, inactive: int = 3) -> ServingCatalog:
    rng = np.random.default_rng(4)
    cat = ServingCatalog(projector.d_user)
    active = np.ones(n, bool)
    active[:inactive] = False
    cat.upsert([f"ad{i}" for i in range(n)], projector.project(rng.standard_normal((n, projector.weight.shape[0]))),
               rng.uniform(0.1, 1.0, n).astype(np.float32), active, [f"c{i % 3}" for i in range(n)])
    return cat


def test_write_version_writes_complete_directory(tmp_path):
    proj = initial_projector(16, 4, 0)
    cat = _catalog(proj)
    models = tmp_path / "models"  # does not exist yet
    before = time.time()
    manifest = write_version(models, proj, cat, {"reason": "test", "parent": None})
    after = time.time()
    version = manifest["version"]
    final = models / version
    assert version.startswith("v") and version[1:].rstrip("b").isdigit()
    assert manifest["path"] == str(final.resolve())
    assert before <= manifest["built_at"] <= after
    assert manifest["index"]["size"] == 17 == len(cat)
    assert manifest["index"]["ads"] == 20
    assert manifest["projector"]["d_in"] == 16 and manifest["projector"]["d_out"] == 4
    assert manifest["reason"] == "test" and manifest["parent"] is None
    assert {p.name for p in final.iterdir()} >= {"projector.npz", "catalog.npz", "catalog.json", MANIFEST}
    assert json.loads((final / MANIFEST).read_text()) == manifest
    assert not list(models.glob(".tmp-*"))  # written under a temporary name, then renamed


def test_write_version_twice_gives_distinct_sortable_versions(tmp_path):
    proj = initial_projector(8, 2, 0)
    cat = _catalog(proj, n=5, inactive=0)
    m1 = write_version(tmp_path, proj, cat, {})
    m2 = write_version(tmp_path, proj, cat, {})
    assert m1["version"] != m2["version"]
    assert m1["version"] < m2["version"]  # newer sorts later (collect_garbage relies on it)
    assert Path(m1["path"]).is_dir() and Path(m2["path"]).is_dir()


def test_load_version_restores_projector_and_catalog(tmp_path):
    proj = Projector(weight=initial_projector(16, 4, 1).weight, bias=np.full(4, 0.1, np.float32))
    cat = _catalog(proj)
    manifest = write_version(tmp_path, proj, cat, {"catalog_change": "5-0"})
    mv = load_version(manifest)
    assert mv.version == manifest["version"] and mv.manifest["catalog_change"] == "5-0"
    np.testing.assert_array_equal(mv.projector.weight, proj.weight)
    np.testing.assert_array_equal(mv.projector.bias, proj.bias)
    assert mv.catalog.ad_ids == cat.ad_ids and mv.catalog.categories == cat.categories
    assert len(mv.catalog) == len(cat) and mv.catalog.d == 4
    np.testing.assert_array_equal(mv.catalog.active_rows(), cat.active_rows())
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = proj.project(rng.standard_normal((1, 16)))[0]
        np.testing.assert_array_equal(mv.catalog.search(q, 5), cat.search(q, 5))


def _versions(models: Path, names: list[str]) -> None:
    for n in names:
        (models / n).mkdir(parents=True)
        (models / n / MANIFEST).write_text("{}")


NAMES = [f"v17000000000{i:02d}" for i in range(6)]  # v1700000000000 … v1700000000005, oldest first


def test_collect_garbage_keeps_newest(tmp_path):
    _versions(tmp_path, NAMES)
    removed = collect_garbage(tmp_path, keep=2, current=NAMES[-1])
    assert sorted(removed) == NAMES[:4]
    assert sorted(p.name for p in tmp_path.iterdir()) == NAMES[4:]


def test_collect_garbage_never_removes_current(tmp_path):
    _versions(tmp_path, NAMES)
    removed = collect_garbage(tmp_path, keep=2, current=NAMES[1])
    assert sorted(removed) == [NAMES[0], NAMES[2], NAMES[3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAMES[1], NAMES[4], NAMES[5]]


def test_collect_garbage_nothing_to_do(tmp_path):
    _versions(tmp_path, NAMES[:2])
    assert collect_garbage(tmp_path, keep=3, current=NAMES[1]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == NAMES[:2]


def test_collect_garbage_same_millisecond_suffix_sorts_after(tmp_path):
    # write_version's collision name "<v>b" is newer than "<v>" and older than the next millisecond
    names = ["v1700000000000", "v1700000000000b", "v1700000000001"]
    _versions(tmp_path, names)
    assert collect_garbage(tmp_path, keep=2, current=names[2]) == ["v1700000000000"]


def test_collect_garbage_removes_only_stale_temporaries_and_ignores_other_files(tmp_path):
    _versions(tmp_path, NAMES[:1])
    stale, fresh = tmp_path / ".tmp-v1", tmp_path / ".tmp-v2"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    (tmp_path / "other").mkdir()
    (tmp_path / "vnotes.txt").write_text("x")  # a file, not a version directory
    collect_garbage(tmp_path, keep=1, current=NAMES[0])
    assert not stale.exists() and fresh.exists()
    assert (tmp_path / "other").exists() and (tmp_path / "vnotes.txt").exists() and (tmp_path / NAMES[0]).exists()


def test_write_then_collect_garbage_end_to_end(tmp_path):
    proj = initial_projector(8, 2, 0)
    cat = _catalog(proj, n=4, inactive=0)
    manifests = []
    for _ in range(5):
        manifests.append(write_version(tmp_path, proj, cat, {}))
        time.sleep(0.002)
    current = manifests[-1]["version"]
    removed = collect_garbage(tmp_path, keep=3, current=current)
    assert sorted(removed) == sorted(m["version"] for m in manifests[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(m["version"] for m in manifests[2:])
    load_version(manifests[-1])  # the current one still loads
