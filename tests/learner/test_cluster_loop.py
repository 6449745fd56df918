"""The core loop on a Redis Cluster of 3 masters and 3 replicas with PRIVADS_DATA on an S3-compatible server:
serving, clicks, exact counters, user learning, erasure, a learner cycle and its hot-swap, export and replay.

The same stack as everywhere else (tansu, a worker and the API as subprocesses), with ``PRIVADS_REDIS`` naming
the cluster's nodes (``redis+cluster://…``): every key one transaction touches shares a slot (``infra.keys``);
and ``PRIVADS_DATA=s3://…`` on a real localbucket server: the archive, the model versions and the export live in
the bucket, and the processes' own files (logs, journal, model cache) in ``PRIVADS_LOCAL_DATA``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from conftest import S3, Infra, serving, wait_until
from helpers import sample_ads
from privads.infra import keys, objects
from privads.infra.kafka import create_topics
from privads.infra.processes import Process, broker_process, free_port, wait_port_free
from privads.infra.redis_cluster import CLUSTER_SLOTS, start_redis_cluster, stop_processes
from privads.infra.settings import Settings
from privads.infra.store import connect_sync

pytestmark = pytest.mark.integration
WINDOW = 3.0
PARTITIONS = 6
ADS = sample_ads(["insurance", "coffee & tea", "gaming"], per_category=4, bid=1.0)
CATEGORY = {a["ad_id"]: a["category"] for a in ADS}
USERS, ROUNDS = 30, 3
VICTIM = "user-7"


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    """A broker and a local Redis Cluster (3 masters, 3 replicas) of this module's own."""
    data = tmp_path_factory.mktemp("privads-cluster")
    kport = free_port()
    broker = broker_process(kport, data / "logs" / "broker.log")
    nodes: list[Process] = []
    try:
        broker.start(timeout=30)
        cluster = start_redis_cluster(data / "cluster", nodes)
        create_topics(f"127.0.0.1:{kport}", partitions=PARTITIONS)
        yield Infra(f"127.0.0.1:{kport}", cluster.url, data, broker, nodes[0])
    finally:
        stop_processes(nodes)
        broker.stop(10)
        wait_port_free("127.0.0.1", kport)


@pytest.fixture(scope="module")
def settings(infra: Infra, s3: S3) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, **s3.settings("loop", local_data=infra.data),
                    partitions=PARTITIONS, catalog=None, seed=5, api=f"http://127.0.0.1:{free_port()}",
                    control_share=0.5, attribution_window_s=WINDOW, archive_every_s=1.0)


@pytest.fixture(scope="module")
def rds(infra: Infra) -> Iterator[redis.RedisCluster]:
    r = connect_sync(infra.redis_url)
    assert isinstance(r, redis.RedisCluster)
    yield r
    r.close()


def privads(settings: Settings, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "privads", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **settings.child_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_core_loop_on_a_redis_cluster_with_its_data_on_s3(infra: Infra, settings: Settings, s3: S3,
                                                              rds: redis.RedisCluster) -> None:
    # the partitions' state is spread over the three masters, not piled on one
    masters = {rds.keyslot(keys.checkpoint(p)) * 3 // CLUSTER_SLOTS for p in range(PARTITIONS)}
    assert masters == {0, 1, 2}
    clicks: dict[str, int] = {}  # user → clicks sent
    per_arm = {"treatment": [0, 0], "control": [0, 0]}  # impressions, clicks
    with serving(infra, settings, rds, ADS) as c:
        first_version = c.get("/model").json()["version"]
        for _ in range(ROUNDS):
            for u in range(USERS):
                user = f"user-{u}"
                body = c.post("/recommend", json={"user_id": user, "k": 4}).json()
                per_arm[body["policy"]][0] += len(body["ads"])
                for a in body["ads"]:
                    if CATEGORY[a["ad_id"]] == "insurance" and a["position"] < 2:  # a known rule, no randomness
                        r = c.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user,
                                                    "ad_id": a["ad_id"]})
                        assert r.status_code == 202, r.text
                        clicks[user] = clicks.get(user, 0) + 1
                        per_arm[body["policy"]][1] += 1
        total = sum(n for n, _ in per_arm.values())
        assert total == USERS * ROUNDS * 4 and sum(clicks.values()) > 0

        # exact counters: every impression labelled, /lift counts what was served and clicked, per arm
        def labelled() -> int:
            return int(rds.hget(keys.STATS, "labelled_clicks") or 0) + int(
                rds.hget(keys.STATS, "labelled_negatives") or 0)

        wait_until(lambda: labelled() == total, 60, "every impression labelled")
        lift = wait_until(lambda: (b := c.get("/lift").json()) and all(
            b["arms"].get(arm, {}).get("impressions") == n for arm, (n, _) in per_arm.items() if n) and b, 30,
            "/lift to count every impression")
        for arm, (n, k) in per_arm.items():
            if n:
                assert (lift["arms"][arm]["impressions"], lift["arms"][arm]["clicks"]) == (n, k), (arm, lift)
        assert int(rds.hget(keys.STATS, "labelled_clicks")) == sum(clicks.values())

        # user learning: each user's state is in its partition's slot, with every impression counted
        for u in range(USERS):
            blob = rds.get(keys.user(f"user-{u}", PARTITIONS))
            assert blob is not None and keys.unpack_user(blob)[2] == ROUNDS * 4, f"user-{u}"

        # erasure: the state goes, the tombstone stays, and nothing the user did is exported
        assert c.delete(f"/users/{VICTIM}").status_code == 204
        assert rds.get(keys.user(VICTIM, PARTITIONS)) is None
        assert rds.get(keys.erased(VICTIM, PARTITIONS)) is not None

        # a learner cycle, hot-swapped by the API
        version = privads(settings, "train")["version"]
        assert version != first_version
        wait_until(lambda: c.get("/model").json()["version"] == version, 30, "the API to swap in the new version")
        served = c.post("/recommend", json={"user_id": "user-0", "k": 4}).json()
        assert served["model_version"] == version and len(served["ads"]) == 4
        total += 4

        # export and replay: one row per impression (the erased user's left out), the on-policy CTR replayed
        wait_until(lambda: labelled() == total, 60, "the last impressions labelled")
        out = f"s3://{s3.bucket}/exports/logs.jsonl"
        victim_rows = ROUNDS * 4

        def exported() -> dict:
            got = privads(settings, "export-logs", str(out))
            return got if got["rows"] == total - victim_rows else {}

        time.sleep(2.0)  # the archive drains every second
        got = wait_until(exported, 60, "the archive to hold every impression")
        assert got["clicked"] == sum(clicks.values()) - clicks.get(VICTIM, 0)
        where, name = objects.at(out, settings)
        rows = [json.loads(line) for line in where.get(name).decode().splitlines()]
        assert VICTIM not in {r["user_id"] for r in rows}
        replayed = privads(settings, "replay", str(out), "--policy", "logged", "--estimators", "ips,snips")
        assert replayed["logged_mean_reward"] == pytest.approx(got["clicked"] / got["rows"])
        assert np.isclose(replayed["estimators"]["snips"]["estimate"], got["clicked"] / got["rows"])

    # where it all is: the archive, the versions and the export in the bucket (as the server keeps them on its
    # disk), none of them in the host's own directory; the API and the worker loaded the versions into its cache
    bucket = s3.root / s3.bucket
    assert list((bucket / "loop" / "archive" / "impressions").rglob("*.parquet"))
    assert (bucket / "loop" / "models" / version / "manifest.json").is_file()
    assert (bucket / "exports" / "logs.jsonl").is_file()
    assert not (infra.data / "archive").exists()
    assert not list((infra.data / "models").glob("v*"))
    assert (infra.data / "cache" / "models" / version / "manifest.json").is_file()
