"""A model version that cannot be read wedges nothing.

With ``model:current`` naming a directory that is gone: the API keeps serving the last good version (``/readyz``
stays 200 and names the bad one), the workers keep heartbeating and draining ``arch:{p}``, each says so once, and
a learner cycle publishes a new version (saying what it could not read) that the API and the workers then follow.
And the artifacts are on disk (``fsync``, files and directories) before a version is announced.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from conftest import start_api, start_worker, wait_until
from helpers import produce, sample_ads
from privads.infra import keys, records
from privads.infra.processes import Process, free_port
from privads.infra.settings import Settings
from privads.ranker import artifacts
from privads.ranker.index import ServingCatalog
from privads.ranker.projector import initial_projector

ADS = sample_ads(["travel deals", "pet supplies"], per_category=6, bid=1.0)
assert len(ADS) == 12
GONE = "v9000000000000"


# --- unit: what write_version flushes, and when --------------------------------------------------------------


def test_a_version_is_fsynced_file_and_directory_before_it_is_named(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: Path) -> Path:
        events.append(("rename", str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    proj = initial_projector(8, 4, seed=1)
    rng = np.random.default_rng(0)
    cat = ServingCatalog.build(4, [f"a{i}" for i in range(5)], proj.project(rng.normal(size=(5, 8)).astype("f4")),
                               np.ones(5, np.float32), np.ones(5, bool), ["c"] * 5)
    models = tmp_path / "models"
    manifest = artifacts.write_version(models, proj, cat, {"reason": "test"}, prior=np.zeros(4, np.float32),
                                       evidence={"treatment": {"a0": (1.0, 0.5)}})
    final = Path(manifest["path"])
    renamed = [i for i, (what, _) in enumerate(events) if what == "rename"]
    assert len(renamed) == 1 and events[renamed[0]][1] == str(final)
    before = {Path(p).name for what, p in events[:renamed[0]] if what == "fsync"}
    files = {p.name for p in final.iterdir()}
    assert {"manifest.json", "projector.npz", "index.faiss", artifacts.PRIOR, artifacts.EVIDENCE} <= files
    assert files <= before, f"not flushed before the rename: {files - before}"
    assert f".tmp-{manifest['version']}" in before  # the directory's entries too
    after = [Path(p) for what, p in events[renamed[0]:] if what == "fsync"]
    assert models in after  # and the rename itself
    # a rewritten manifest: flushed, then its directory
    events.clear()
    artifacts.write_manifest({**manifest, "note": "rewritten"})
    flushed = [Path(p).name for what, p in events if what == "fsync"]
    assert flushed == [f".{artifacts.MANIFEST}.tmp", final.name], events
    assert json.loads((final / artifacts.MANIFEST).read_text())["note"] == "rewritten"


def test_loading_a_version_whose_directory_is_gone_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"model version {GONE}: directory .* is missing"):
        artifacts.load_version({"version": GONE, "path": str(tmp_path / GONE)})


# --- integration: a worker, an API and learner cycles on a real broker and Redis ------------------------------


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    # the archive drained every second, so that a drain that stopped shows within the test
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, control_share=0.0,
                    catalog=None, seed=11, api=f"http://127.0.0.1:{free_port()}", archive_every_s=1.0)


@pytest.fixture(scope="module")
def running(infra, settings: Settings, rds: redis.Redis) -> Iterator[tuple[Process, Process]]:
    """A worker with the catalog stored, a first version published, and an API serving it."""
    procs: list[Process] = []
    try:
        procs.append(start_worker(settings, rds))
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the worker to store the catalog")
        cycle(settings)
        procs.append(start_api(settings))
        yield procs[0], procs[1]
    finally:
        for p in reversed(procs):
            p.stop(20)


def cycle(settings: Settings) -> dict:
    from privads.learner.cycle import run_cycle

    return asyncio.run(run_cycle(settings, reason="test"))


def readyz(settings: Settings) -> dict:
    r = httpx.get(f"{settings.api}/readyz", timeout=5)
    return {"code": r.status_code, **r.json()}


def recommend(settings: Settings, user: str) -> dict:
    r = httpx.post(f"{settings.api}/recommend", json={"user_id": user, "k": 4}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def archived_impressions(settings: Settings) -> set[str]:
    return {e for f in (settings.local / "archive" / "impressions").rglob("*.parquet")
            for e in pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()}


def beat_ts(rds: redis.Redis) -> float:
    return max(json.loads(v)["ts"] for v in rds.hgetall(keys.WORKERS).values())


@pytest.mark.integration
def test_a_version_whose_directory_is_gone_wedges_nothing(settings: Settings, rds: redis.Redis, running) -> None:
    good = json.loads(rds.get(keys.MODEL_CURRENT))
    wait_until(lambda: readyz(settings)["model_version"] == good["version"], 30, "the API to serve the first version")
    worker_log = settings.local / "logs" / "worker.log"
    api_log = settings.local / "logs" / "api.log"
    wait_until(lambda: f"workers now project ads with model {good['version']}" in worker_log.read_text(), 30,
               "the worker to follow the first version")

    # model:current now names a version whose directory is gone
    bad = {**good, "version": GONE, "path": str(settings.models_dir / GONE), "built_at": time.time()}
    assert not Path(bad["path"]).exists()
    broken_at = time.time()
    rds.set(keys.MODEL_CURRENT, json.dumps(bad))

    # the API: still ready, serving the last good version, naming the bad one and why
    state = wait_until(lambda: (s := readyz(settings))["skipped"] and s, 15, "/readyz to report the bad version")
    assert isinstance(state, dict)
    assert state["code"] == 200 and state["status"] == "ready" and state["model_version"] == good["version"], state
    assert state["skipped"]["version"] == GONE and "is missing" in state["skipped"]["reason"], state
    served = [recommend(settings, f"u{i}") for i in range(6)]
    assert all(len(r["ads"]) == 4 and r["model_version"] == good["version"] for r in served), served
    shown = {a["impression_id"] for r in served for a in r["ads"]}

    # the workers: heartbeating, and the impressions just served go from arch:{p} into Parquet
    wait_until(lambda: beat_ts(rds) > broken_at + 3, 15, "a heartbeat 3 s after the version broke")
    wait_until(lambda: shown <= archived_impressions(settings), 30, "the served impressions to be archived")
    wait_until(lambda: all(rds.xlen(keys.archive(p)) == 0 for p in range(settings.partitions)), 15,
               "arch:{p} to drain")
    # several retries have passed by now (every 2, 4, 8 s ...): each process said it once
    time.sleep(max(0.0, broken_at + 7 - time.time()))
    assert readyz(settings)["model_version"] == good["version"]
    assert worker_log.read_text().count(f"loading the projector of model {GONE}") == 1
    assert api_log.read_text().count(f"loading model {GONE} failed") == 1

    # a learner cycle publishes a version from what it can read, and says what it could not
    fresh = cycle(settings)
    assert fresh["parent"] == GONE and fresh["version"] not in (GONE, good["version"])
    assert any(u.startswith("projector: FileNotFoundError") for u in fresh["recovered"]["unreadable"]), fresh
    assert fresh["projector"]["fit"] == "catalog" and "projector" in fresh["changed"]
    assert json.loads(rds.get(keys.MODEL_CURRENT))["version"] == fresh["version"]
    # everyone follows it
    state = wait_until(lambda: (s := readyz(settings))["model_version"] == fresh["version"] and s, 15,
                       "the API to serve the new version")
    assert isinstance(state, dict) and state["code"] == 200 and state["skipped"] is None
    wait_until(lambda: f"workers now project ads with model {fresh['version']}" in worker_log.read_text(), 15,
               "the worker to follow the new version")
    after = recommend(settings, "after")
    assert len(after["ads"]) == 4 and after["model_version"] == fresh["version"]
