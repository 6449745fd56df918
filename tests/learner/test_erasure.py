"""Erasure reaches every copy, on a real broker, redis-server, worker and API.

A user whose id holds a "/" is served and clicks beside others; the archive is
settled and exported; then ``DELETE /users/{id}``. From then on export-logs,
replay and the learner's examples hold none of the user's rows (even once the same
id is back with new traffic), a compaction pass removes them from the archive's
files, and producing the old export back (a backfill) does not bring the user back.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import redis

from conftest import Infra, serving, wait_until
from helpers import learner_examples, sample_ads
from privads.infra import keys, records
from privads.infra.partitioning import owner
from privads.infra.processes import free_port
from privads.infra.settings import Settings
from privads.infra.store import connect
from privads.learner.cycle import Examples
from privads.learner.erasure import compact_archive, without_erased
from privads.streams import archive

pytestmark = pytest.mark.integration
WINDOW = 2.0
ADS = sample_ads(["insurance", "gaming"], per_category=5, bid=1.0)
VICTIM = "team/alice"  # a "/" in the id: /recommend accepts it, so DELETE must too
OTHERS = [f"user-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def settings(infra: Infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=3,
                    api=f"http://127.0.0.1:{free_port()}", control_share=0.0, attribution_window_s=WINDOW,
                    archive_every_s=0.5, dedupe_horizon_s=0.0)  # a backfill of the old export is not a duplicate


def privads(settings: Settings, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "privads", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **settings.child_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def labelled(r: redis.Redis) -> int:
    return int(r.hget(keys.STATS, "labelled_clicks") or 0) + int(r.hget(keys.STATS, "labelled_negatives") or 0)


def serve(c: httpx.Client, user: str, requests: int = 3) -> tuple[int, int]:
    """``requests`` requests of 4 ads for ``user``, the top ad clicked each time; (impressions, clicks)."""
    shown = 0
    for _ in range(requests):
        ads = c.post("/recommend", json={"user_id": user, "k": 4, "context": {"device": "mobile"}}).json()["ads"]
        shown += len(ads)
        top = ads[0]
        assert c.post("/clicks", json={"impression_id": top["impression_id"], "user_id": user,
                                       "ad_id": top["ad_id"]}).status_code == 202
    return shown, requests


def settle(r: redis.Redis, total: int) -> None:
    """Every impression labelled (clicked, or its window passed), and the archive drained to Parquet."""
    wait_until(lambda: labelled(r) >= total, 60, f"{total} impressions labelled")
    wait_until(lambda: all(r.xlen(keys.archive(p)) == 0 for p in range(2)), 30, "the archive drained")
    time.sleep(1.0)  # a drain that read its chunk just before the trim check writes it now


def archived_users(settings: Settings) -> dict[str, set[str]]:
    root = settings.local / "archive"
    return {kind: set(archive.read_table(root, kind).column("user_id").to_pylist())
            for kind in ("impressions", "labels")}


def examples(settings: Settings) -> Examples | None:
    return learner_examples(settings)


@pytest.fixture(scope="module")
def stack(infra: Infra, settings: Settings, rds: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with serving(infra, settings, rds, ADS) as c:
        total = 0
        for user in [VICTIM, *OTHERS]:
            total += serve(c, user)[0]
        settle(rds, total)
        yield {"client": c, "total": total, "dir": tmp_path_factory.mktemp("exports")}


def test_erasure_reaches_export_replay_learner_archive_and_survives_a_backfill(
        settings: Settings, rds: redis.Redis, stack: dict[str, Any]) -> None:
    c: httpx.Client = stack["client"]
    before = stack["dir"] / "before.jsonl"
    assert privads(settings, "export-logs", str(before))["rows"] == stack["total"]
    rows = [json.loads(line) for line in before.read_text().splitlines()]
    mine = [row for row in rows if row["user_id"] == VICTIM]
    assert len(mine) == 12 and sum(row["clicked"] for row in mine) == 3
    assert VICTIM in archived_users(settings)["impressions"] and rds.exists(keys.user(VICTIM, settings.partitions))

    # percent-encoded, as a client must send an id with "/"
    assert c.delete(f"/users/{quote(VICTIM, safe='')}").status_code == 204
    assert not rds.exists(keys.user(VICTIM, settings.partitions))
    # the tombstone is kept for good: no backfill however late
    assert rds.ttl(keys.erased(VICTIM, settings.partitions)) == -1
    assert rds.zscore(keys.erasures(owner(VICTIM.encode(), settings.partitions)), keys.user_hash(VICTIM)) is not None

    # the same id comes back with new traffic after the erasure: a new user, whose new rows are fine to keep
    shown, _ = serve(c, VICTIM, requests=1)
    settle(rds, stack["total"] + shown)

    # export-logs: none of the erased rows, every other row
    after = stack["dir"] / "after.jsonl"
    out = privads(settings, "export-logs", str(after))
    assert out["erased_rows_left_out"] == len(mine)
    exported = [json.loads(line) for line in after.read_text().splitlines()]
    assert {row["event_id"] for row in exported} >= {row["event_id"] for row in rows if row["user_id"] != VICTIM}
    assert not {row["event_id"] for row in exported} & {row["event_id"] for row in mine}
    assert sum(row["user_id"] == VICTIM for row in exported) == shown  # the new life only

    # replay of the export made before the erasure leaves the user's rows out
    replay = privads(settings, "replay", str(before), "--policy", "logged", "--estimators", "ips")
    assert replay["erasures"] == {"registry_read": True, "rows_left_out": len(mine)}
    assert replay["rows"] == stack["total"] - len(mine)

    # the learner's examples: not one of the erased impressions, though the id has a state again
    wait_until(lambda: rds.exists(keys.user(VICTIM, settings.partitions)), 30, "the returning id's new state")
    ex = examples(settings)
    assert ex is not None and len(ex.event_ids) > 0
    assert not set(ex.event_ids.tolist()) & {row["event_id"] for row in mine}

    # the archive's files: a pass removes the rows, and settles the erasure (every batch from before it is drained)
    first = asyncio.run(_compact(settings, time.time()))
    assert first == {"pending": 1, "files": first["files"], "rows": len(mine) + 3, "settled": 1, "hours_pruned": 0}
    assert first["files"] >= 1
    files = archived_users(settings)
    imps = archive.read_table(settings.local / "archive", "impressions").to_pylist()
    assert {row["event_id"] for row in imps if row["user_id"] == VICTIM}.isdisjoint(e["event_id"] for e in mine)
    assert VICTIM in files["impressions"]  # the new life's rows stay
    assert rds.zcard(keys.erasures(owner(VICTIM.encode(), settings.partitions))) == 0
    assert rds.exists(keys.erased(VICTIM, settings.partitions))
    assert asyncio.run(_compact(settings, time.time()))["pending"] == 0

    # a backfill of the old export: the worker ignores every erased event, and the drain archives none of them
    skipped = int(rds.hget(keys.STATS, "skipped_erased") or 0)
    old = stack["dir"] / "victim-only.jsonl"
    old.write_text("".join(json.dumps(row) + "\n" for row in mine))
    privads(settings, "produce", records.CLICKS, str(old))
    privads(settings, "produce", records.IMPRESSIONS, str(old))
    wait_until(lambda: int(rds.hget(keys.STATS, "skipped_erased") or 0) >= skipped + len(mine), 60,
               "the backfilled events to be skipped as erased")
    time.sleep(2.0)  # drains
    imps = archive.read_table(settings.local / "archive", "impressions").to_pylist()
    assert {row["event_id"] for row in imps}.isdisjoint(e["event_id"] for e in mine)
    labs = archive.read_table(settings.local / "archive", "labels").to_pylist()
    assert {row["impression_id"] for row in labs}.isdisjoint(e["event_id"] for e in mine)


async def _compact(settings: Settings, now: float) -> dict[str, Any]:
    r = connect(settings.redis_url)
    try:
        return await compact_archive(settings, r, now=now)
    finally:
        await r.aclose()


def test_without_erased_keeps_rows_after_the_erasure_and_of_other_users() -> None:
    keep = without_erased(["a", "a", "b", "a"], np.array([1.0, 5.0, 1.0, 5.0001]), {"a": 5.0})
    assert keep.tolist() == [False, False, True, True]


def test_compact_rewrites_only_files_with_erased_rows(tmp_path: Path) -> None:
    imps = [{"event_id": f"e{i}", "ts": 1_000.0 + i, "user_id": ["x", "y"][i % 2], "ad_id": "ad", "position": 0,
             "propensity": 1.0, "policy": "treatment", "model_version": None, "request_id": f"r{i}"}
            for i in range(6)]
    archive.write_chunk(tmp_path, 0, "1000000_0", [(b"1-0", {b"imp": b"\n".join(json.dumps(i).encode()
                                                                              for i in imps)})])
    only_y = [{**i, "user_id": "y", "event_id": f"f{n}"} for n, i in enumerate(imps)]
    archive.write_chunk(tmp_path, 1, "1000000_1", [(b"1-1", {b"imp": b"\n".join(json.dumps(i).encode()
                                                                              for i in only_y)})])
    untouched = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("p1-*.parquet")}
    # x erased at 1003.5: rows e0, e2 (before) go, e4 (after: a new user of the same id) stays
    files, rows = archive.compact(tmp_path, {keys.user_hash("x"): 1_003.5})
    assert (files, rows) == (1, 2)
    got = sorted(archive.read_table(tmp_path, "impressions").column("event_id").to_pylist())
    assert got == sorted(["e1", "e3", "e4", "e5", *(f"f{n}" for n in range(6))])
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("p1-*.parquet")} == untouched
    assert archive.compact(tmp_path, {keys.user_hash("x"): 1_003.5}) == (0, 0)  # idempotent


def test_an_erasure_stays_pending_while_a_batch_from_before_it_waits_to_be_archived(
        infra: Infra, tmp_path: Path) -> None:
    """Redis database 1 of the module's server: one partition whose archive stream still holds an old batch."""
    r1 = redis.Redis.from_url(infra.redis_url.rsplit("/", 1)[0] + "/1")
    local = Settings(redis=infra.redis_url.rsplit("/", 1)[0] + "/1", data=tmp_path, catalog=None)
    try:
        r1.flushdb()
        r1.set(keys.PARTITIONS, 1)
        r1.xadd(keys.archive(0), {b"imp": b""}, id="1000-0")  # committed at t = 1 s, long before the erasure
        r1.zadd(keys.erasures(0), {keys.user_hash("someone"): 500.0})
        assert asyncio.run(_compact(local, 600.0))["settled"] == 0
        assert r1.zcard(keys.erasures(0)) == 1
        r1.xtrim(keys.archive(0), minid="1000-1", approximate=False)  # drained (written, then trimmed)
        assert asyncio.run(_compact(local, 601.0))["settled"] == 1
        assert r1.zcard(keys.erasures(0)) == 0
    finally:
        r1.flushdb()
        r1.close()
