"""``privads simulate`` against a real stack: it fills the catalog, drives /recommend and reports its clicks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import redis

from conftest import start_api, start_worker, stopping, wait_until
from privads.infra.processes import free_port
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=2,
                    api=f"http://127.0.0.1:{free_port()}", control_share=0.3)


def test_simulate_reports_per_arm_against_the_oracle_and_its_clicks_reach_the_stream(
        settings: Settings, rds: redis.Redis) -> None:
    with stopping() as procs:
        procs.append(start_worker(settings, rds))
        procs.append(start_api(settings))
        proc = subprocess.run([sys.executable, "-m", "privads", "simulate", "--users", "30", "--ads", "20",
                               "--requests", "400", "--seed", "3", "--concurrency", "4"],
                              capture_output=True, text=True, timeout=600, env={**os.environ, **settings.child_env()})
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout)
        assert out["failed_calls"] == 0 and set(out["arms"]) == {"treatment", "control"}
        # no catalog file: the audience's ads bid 1.0, and every shown ad is theirs
        assert out["bid"] == "catalog" and out["bids"] == {"min": 1.0, "median": 1.0, "max": 1.0}
        assert out["catalog_ads"] == 0 and out["unknown_bid_impressions"] == 0
        assert sum(a["requests"] for a in out["arms"].values()) == 400
        for a in out["arms"].values():
            assert a["impressions"] == 10 * a["requests"]
            assert 0 < a["random_ctr"] < a["oracle_ctr"] and len(a["efficiency_by_quarter"]) == 4
            assert a["expected_ctr"] <= a["oracle_ctr"] + 1e-12
            assert 0 < a["random_value"] < a["oracle_value"] and len(a["value_efficiency_by_quarter"]) == 4
            assert a["expected_value"] <= a["oracle_value"] + 1e-12
        clicks = sum(a["clicks"] for a in out["arms"].values())
        assert clicks > 0
        # every click it reported was joined and counted by the workers
        with httpx.Client(base_url=settings.api, timeout=10) as c:
            wait_until(lambda: sum(a["clicks"] for a in c.get("/lift").json()["arms"].values()) == clicks, 30,
                       "the simulated clicks in /lift")
        assert out["lift"]["arms"]["treatment"]["impressions"] > 0
