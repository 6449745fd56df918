"""A learner cycle publishes a version that the API swaps in while serving, without a failed request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest

from conftest import wait_until
from helpers import produce, read_topic, sample_ads
from privads.infra import records

pytestmark = pytest.mark.integration
ADS = sample_ads(["gardening", "jewellery"], per_category=8)


def train(settings) -> dict:
    env = {**os.environ, **settings.child_env()}
    r = subprocess.run([sys.executable, "-m", "privads", "train"], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return json.loads(r.stdout)


def test_train_while_serving_swaps_version_with_no_failed_request(infra, settings, api: httpx.Client) -> None:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: api.get("/healthz").json()["ads"] == len(ADS), 60, "the API to index the catalog")
    before = api.get("/model").json()["version"]
    results: list[int | str] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=settings.api, timeout=10) as c:
            i = 0
            while not stop.is_set():
                try:
                    r = c.post("/recommend", json={"user_id": f"h{i % 50}", "k": 5})
                    results.append(r.status_code if r.status_code != 200 or len(r.json()["ads"]) == 5 else "short")
                except httpx.HTTPError as e:
                    results.append(repr(e))
                i += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        published = [train(settings)["version"] for _ in range(4)]
        wait_until(lambda: api.get("/model").json()["version"] == published[-1], 30, "the API to serve the new version")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert before != published[-1]
    assert len(results) > 50
    failures = [r for r in results if r != 200]
    assert failures == [], f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    model = api.get("/model").json()
    assert model["index"]["size"] == len(ADS)
    # old versions are garbage-collected: keep_versions (3) remain
    assert sorted(p.name for p in settings.models_dir.glob("v*")) == sorted(published[-settings.keep_versions:])
    updates = [m["version"] for m in read_topic(infra.kafka, records.MODEL_UPDATES)]
    assert published[-1] in updates and set(published) <= set(updates)
