"""Logged traffic of a real stack → export-logs → replay of every policy kind, and backfill by produce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pandas as pd
import pytest
import redis

from conftest import Infra, start_api, start_worker, stopping, wait_until
from helpers import produce, sample_ads
from privads.infra import keys, records
from privads.infra.kafka import create_topics
from privads.infra.processes import broker_process, free_port, redis_process, wait_port_free
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
WINDOW = 3.0
ADS = sample_ads(["insurance", "coffee & tea", "gaming"], per_category=6, bid=1.0)
LIKES = {"insurance": 0.5, "coffee & tea": 0.1, "gaming": 0.02}  # the simulated users' click rates by category
CATEGORY = {a["ad_id"]: a["category"] for a in ADS}


@pytest.fixture(scope="module")
def settings(infra: Infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=5,
                    api=f"http://127.0.0.1:{free_port()}", control_share=0.0, attribution_window_s=WINDOW,
                    archive_every_s=1.0)


def privads(settings: Settings, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "privads", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **settings.child_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def user_states(r: redis.Redis) -> dict[str, tuple[np.ndarray, int]]:
    out = {}
    for key in r.scan_iter(match=keys.USER_PREFIX + "*", count=1000):
        mean, _, count = keys.unpack_user(r.get(key))
        out[key.decode()[len(keys.USER_PREFIX):]] = (mean, count)
    return out


@pytest.fixture(scope="module")
def traffic(infra: Infra, settings: Settings, rds: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """40 users × 4 requests of 4 ads, clicks by a known click model; the archive settled and exported."""
    rng = np.random.default_rng(3)
    sent_clicks = 0
    with stopping() as procs:
        procs.append(start_worker(settings, rds))
        procs.append(api := start_api(settings))
        with httpx.Client(base_url=settings.api, timeout=10) as c:
            produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
            wait_until(lambda: c.get("/healthz").json()["ads"] == len(ADS), 60, "the catalog")
            for _ in range(4):
                for u in range(40):
                    body = c.post("/recommend", json={"user_id": f"user-{u}", "k": 4,
                                                      "context": {"device": ["mobile", "desktop"][u % 2]}}).json()
                    for a in body["ads"]:
                        if rng.random() < LIKES[CATEGORY[a["ad_id"]]] * 0.8 ** a["position"]:
                            c.post("/clicks", json={"impression_id": a["impression_id"], "user_id": f"user-{u}",
                                                    "ad_id": a["ad_id"]})
                            sent_clicks += 1
        total = 4 * 40 * 4
        # every impression settled (clicked, or its window passed) and drained to Parquet
        wait_until(lambda: int(rds.hget(keys.STATS, "labelled_clicks") or 0)
                   + int(rds.hget(keys.STATS, "labelled_negatives") or 0) >= total, 60, "every impression labelled")
        time.sleep(2.5)  # the archive drain runs every second
        out = tmp_path_factory.mktemp("export")
        yield {"total": total, "clicks": sent_clicks, "dir": out, "states": user_states(rds), "api": api}


def test_export_logs_is_one_row_per_impression_readable_by_pandas_and_duckdb(settings: Settings, traffic) -> None:
    jsonl, parquet = traffic["dir"] / "logs.jsonl", traffic["dir"] / "logs.parquet"
    for out in (jsonl, parquet):
        got = privads(settings, "export-logs", str(out))
        assert got == {"out": str(out), "rows": traffic["total"], "clicked": traffic["clicks"],
                       "erased_rows_left_out": 0}
    a = pd.read_json(jsonl, lines=True)
    b = pd.read_parquet(parquet)
    assert len(a) == len(b) == traffic["total"] and a["event_id"].is_unique
    assert set(a["event_id"]) == set(b["event_id"]) and int(b["clicked"].sum()) == traffic["clicks"]
    assert {"ts", "user_id", "ad_id", "position", "propensity", "policy", "model_version", "request_id", "context",
            "clicked", "value", "user_mean", "user_count"} <= set(b.columns)
    assert b["user_mean"].map(lambda m: isinstance(m, str) and len(m) == 172).all()
    assert ((b["propensity"] > 0) & (b["propensity"] <= 1)).all() and set(b["position"]) == {0, 1, 2, 3}
    ((n, clicks, requests),) = duckdb.sql(f"SELECT count(*), sum(clicked), count(DISTINCT request_id) "
                                          f"FROM '{parquet}'").fetchall()
    assert (n, clicks, requests) == (traffic["total"], traffic["clicks"], 160)
    assert json.loads(b["context"].iloc[0]) in ({"device": "mobile"}, {"device": "desktop"})


def test_replay_of_the_logged_policy_gives_the_on_policy_ctr_and_model_policies_run(settings: Settings,
                                                                                     traffic) -> None:
    log = traffic["dir"] / "logs.jsonl"
    ctr = traffic["clicks"] / traffic["total"]
    out = privads(settings, "replay", str(log), "--policy", "logged", "--estimators", "ips,snips,dm,dr")
    assert out["logged_mean_reward"] == pytest.approx(ctr)
    for name in ("ips", "snips", "dr"):
        assert out["estimators"][name]["estimate"] == pytest.approx(ctr, abs=1e-9)
    # the served model, through the code of /recommend (a version is trained first)
    version = privads(settings, "train")["version"]
    for policy in ("current", version):
        got = privads(settings, "replay", str(traffic["dir"] / "logs.parquet"), "--policy", policy, "--draws", "128")
        assert got["policy"].startswith(f"model {version}") and got["rows"] == traffic["total"]
        assert any("re-ranked 160 logged requests" in note for note in got["notes"])
        # every request logged its user as served: none is re-ranked from today's state, which learned from it
        assert any(note.startswith("160 requests re-ranked from the user as served") for note in got["notes"])
        assert not any("today's in Redis" in note for note in got["notes"])
        for r in got["estimators"].values():
            assert r["ci_lo"] <= r["estimate"] <= r["ci_hi"] and 0 <= r["estimate"] <= 1, r
    uniform = privads(settings, "replay", str(log), "--policy", "uniform", "--estimators", "ips,snips")
    # the action set is the ads the log holds (the policy need not have shown every ad of the catalog)
    logged_ads = pd.read_json(log, lines=True)["ad_id"].nunique()
    assert uniform["actions"] == logged_ads <= len(ADS) and uniform["estimators"]["ips"]["ess"] > 0


@pytest.fixture()
def fresh_stack(tmp_path: Path) -> Iterator[Infra]:
    """A second, empty broker and redis-server: what is left after losing the learned state."""
    kport, rport = free_port(), free_port()
    broker = broker_process(kport, tmp_path / "broker.log")
    red = redis_process(rport, tmp_path / "redis", tmp_path / "redis.log")
    try:  # started inside: a failed start still stops what did start
        broker.start(30)
        red.start(30)
        create_topics(f"127.0.0.1:{kport}", partitions=2)
        yield Infra(f"127.0.0.1:{kport}", f"redis://127.0.0.1:{rport}/0", tmp_path, broker, red)
    finally:
        red.stop(10)
        broker.stop(10)
        wait_port_free("127.0.0.1", kport)


def test_producing_an_exported_log_rebuilds_the_learned_users(settings: Settings, traffic, fresh_stack: Infra) -> None:
    log = traffic["dir"] / "logs.jsonl"
    fresh = settings.model_copy(update={"kafka": fresh_stack.kafka, "redis": fresh_stack.redis_url,
                                        "data": fresh_stack.data})
    r = redis.Redis.from_url(fresh.redis_url)
    worker = start_worker(fresh, r)
    try:
        produce(fresh.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: r.scard(keys.ADS) == len(ADS), 60, "the catalog in the fresh stack")
        # clicks first: they wait for their impressions, which then join them at once; impressions first would
        # find their windows closed by the time the (older) clicks arrive
        clicks = privads(fresh, "produce", records.CLICKS, str(log))
        assert clicks == {"topic": records.CLICKS, "produced": traffic["clicks"], "invalid": 0,
                          "skipped_not_clicked": traffic["total"] - traffic["clicks"]}
        imps = privads(fresh, "produce", records.IMPRESSIONS, str(log))
        assert imps == {"topic": records.IMPRESSIONS, "produced": traffic["total"], "invalid": 0}
        want = traffic["states"]

        def rebuilt() -> dict | None:
            got = user_states(r)
            return got if {u: c for u, (_, c) in got.items()} == {u: c for u, (_, c) in want.items()} else None

        got = wait_until(rebuilt, 60, "every user rebuilt with the same number of labelled impressions")
        # the same updates, in a different order within each user: the vectors agree closely, not bit for bit
        # (a replayed batch holds many of a user's impressions, whose fast negatives all come before its clicks'
        # halves; served live they interleaved: seen ≥ 0.9488, every user, with the factors served replayed)
        cosines = {u: float(got[u][0] @ mean / (np.linalg.norm(got[u][0]) * np.linalg.norm(mean) + 1e-12))
                   for u, (mean, _) in want.items()}
        for u, cos in cosines.items():
            assert cos > 0.9, (u, cos)
        stats = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
        assert stats.get("labelled_clicks") == traffic["clicks"] and stats.get("late_clicks", 0) == 0, stats
    finally:
        worker.stop(20)
        r.close()
