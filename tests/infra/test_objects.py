"""``infra.objects``: the same file operations on a local directory and on a real S3-compatible server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import S3
from privads.infra import keys, objects
from privads.infra.objects import Objects
from privads.infra.settings import Settings
from privads.ranker import artifacts
from privads.ranker.index import ServingCatalog
from privads.ranker.projector import initial_projector
from privads.streams import archive

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Objects]:
    if request.param == "local":
        yield objects.local(tmp_path / "data")
        return
    s3: S3 = request.getfixturevalue("s3")
    prefix = f"t/{request.node.name.replace('[', '-').rstrip(']')}"
    yield objects.s3(f"s3://{s3.bucket}/{prefix}", s3.endpoint, "privads", "privads").with_cache(tmp_path / "cache")


def test_put_get_list_and_delete(store: Objects) -> None:
    assert store.files() == [] and store.dirs() == [] and not store.exists("a/b.txt")
    store.put("a/b.txt", b"one")
    store.put_all([("a/c.txt", b"two"), ("d/e/f.txt", b"three")])
    assert store.get("a/b.txt") == b"one" and store.exists("a/c.txt")
    assert store.files() == ["a/b.txt", "a/c.txt", "d/e/f.txt"] and store.files("d") == ["d/e/f.txt"]
    assert store.dirs() == ["a", "d"] and store.dirs("d") == ["e"]
    store.put("a/b.txt", b"replaced")
    assert store.get("a/b.txt") == b"replaced"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt") and store.files("a") == ["a/c.txt"]
    store.delete("a/b.txt")  # gone already: not an error
    assert store.delete_tree("d") == 1 and store.files() == ["a/c.txt"]
    with pytest.raises(FileNotFoundError, match="a/nothing"):
        store.get("a/nothing")
    # the same tree seen from a child
    assert store.child("a").files() == ["c.txt"] and store.child("a").get("c.txt") == b"two"


def test_put_all_is_all_or_none(store: Objects) -> None:
    class Boom(Exception):
        pass

    def items() -> Iterator[tuple[str, bytes]]:
        yield "x/1.bin", b"1"
        yield "x/2.bin", b"2"
        raise Boom("the third file cannot be written")

    with pytest.raises(Boom):
        store.put_all(items())
    assert store.files() == []  # neither the first nor the second is visible
    leftovers = store.local_path()
    if leftovers is not None:
        assert not [p for p in leftovers.rglob("*") if p.is_file()]  # no temporary file left either


def test_the_archive_drains_reads_prunes_and_compacts_the_same_on_both(store: Objects) -> None:
    t0 = 1_700_000_000.0
    rows = [{"event_id": f"e{i}", "ts": t0 + 1800 * i, "user_id": f"u{i % 2}", "ad_id": "a", "position": 0,
             "propensity": 0.5, "policy": "treatment", "model_version": "v1", "request_id": f"r{i}", "raw": "{}",
             "user_mean": None, "user_count": None} for i in range(4)]  # two hours
    cols = {k: [r[k] for r in rows] for k in archive.IMPRESSION_SCHEMA.names}
    labels = {"impression_id": ["e3"], "user_id": ["u1"], "ad_id": ["a"], "ts": [t0 + 5500], "clicked": [1],
              "value": [None], "policy": ["treatment"]}
    assert archive.write_columns(store, 0, "1700000000000_0", cols, labels) == 5
    hours = store.dirs("impressions")
    assert hours == [f"hour={archive.hour_of(t0)}", f"hour={archive.hour_of(t0 + 3600)}"]
    assert archive.read_table(store, "impressions").column("event_id").to_pylist() == ["e0", "e1", "e2", "e3"]
    assert archive.newest_ts(store) == t0 + 5400
    recent = archive.read_recent(store, "impressions", since=t0 + 3600, limit=10)
    assert recent.column("event_id").to_pylist() == ["e2", "e3"]
    # erasure: u1's rows from before its erasure go, file by file
    files, removed = archive.compact(store, {keys.user_hash("u1"): t0 + 10_000})
    assert removed == 3 and archive.read_table(store, "impressions").column("user_id").to_pylist() == ["u0", "u0"]
    assert archive.read_table(store, "labels").num_rows == 0
    # retention: the first hour goes, whole
    assert archive.prune(store, t0 + 3600) >= 1
    assert archive.read_table(store, "impressions").column("event_id").to_pylist() == ["e2"]


def test_a_model_version_is_published_whole_and_read_back(store: Objects, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    proj = initial_projector(16, 4, seed=0)
    cat = ServingCatalog.build(4, [f"ad-{i}" for i in range(30)], proj.project(rng.standard_normal((30, 16))),
                               np.ones(30, np.float32), np.ones(30, bool), ["c"] * 30)
    manifest = artifacts.write_version(store, proj, cat, {"reason": "test"}, prior=np.arange(4, dtype=np.float32))
    version = manifest["version"]
    # published: the manifest is there, with every other file before it
    assert store.exists(f"{version}/{artifacts.MANIFEST}")
    assert {k.split("/", 1)[1] for k in store.files(version)} >= {artifacts.MANIFEST, "projector.npz", artifacts.PRIOR}
    assert manifest["path"] == (str(store.local_path(version)) if store.is_local else store.url_of(version))
    read = artifacts.read_manifest(store, version)
    assert read["version"] == version and read["path"] == manifest["path"]
    # another host: a fresh cache, filled on first load
    other = store if store.is_local else store.with_cache(tmp_path / "other-host")
    loaded = artifacts.load_version(read, other)
    assert loaded.version == version and np.array_equal(loaded.prior, np.arange(4, dtype=np.float32))
    assert np.allclose(loaded.projector.weight, proj.weight)
    if not store.is_local:
        assert (tmp_path / "other-host" / version / artifacts.MANIFEST).is_file()
    # a rewritten manifest is read back as rewritten
    artifacts.write_manifest({**manifest, "note": "rewritten"}, store)
    assert json.loads(store.get(f"{version}/{artifacts.MANIFEST}"))["note"] == "rewritten"
    # half a version (no manifest) is no version
    store.put("v9999999999999/projector.npz", b"partial")
    with pytest.raises(FileNotFoundError, match="v9999999999999"):
        artifacts.read_manifest(store, "v9999999999999")
    # garbage collection keeps the newest, removes the rest (and this host's copies of them)
    second = artifacts.write_version(store, proj, cat, {})
    removed = artifacts.collect_garbage(store, keep=1, current=second["version"])
    assert version in removed and not store.files(version)
    assert not store.is_local or not (tmp_path / "data" / version).exists()


def test_data_of_settings(s3: S3, tmp_path: Path) -> None:
    on_s3 = Settings(**s3.settings("deploy"), local_data=tmp_path)
    data = objects.data_of(on_s3)
    assert data.url == f"s3://{s3.bucket}/deploy" and not data.is_local
    objects.archive_of(on_s3).put("x", b"1")
    assert (s3.root / s3.bucket / "deploy" / "archive" / "x").read_bytes() == b"1"  # where the server keeps it
    models = objects.models_of(on_s3)
    assert models.url == f"s3://{s3.bucket}/deploy/models" and models.cache == tmp_path / "cache" / "models"
    local = Settings(data=tmp_path / "d")
    assert objects.archive_of(local).local_path() == (tmp_path / "d" / "archive").resolve()
    assert objects.models_of(local).local_path() == (tmp_path / "d" / "models").resolve()
    table = pa.table({"a": [1, 2]})
    objects.archive_of(local).put("t.parquet", objects.table_bytes(table))
    assert objects.archive_of(local).read_table("t.parquet").equals(table)
