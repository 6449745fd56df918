"""A learner cycle publishes a version that the API swaps in while serving, without a failed request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from conftest import wait_until
from helpers import produce, read_topic, sample_ads
from privads.infra import keys, records
from privads.ranker.artifacts import PRIOR
from privads.ranker.updates import population_prior

pytestmark = pytest.mark.integration
ADS = sample_ads(["gardening", "jewellery"], per_category=8)


def train(settings) -> dict:
    env = {**os.environ, **settings.child_env()}
    r = subprocess.run([sys.executable, "-m", "privads", "train"], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return json.loads(r.stdout)


def test_train_while_serving_swaps_version_with_no_failed_request(infra, settings, api: httpx.Client, rds) -> None:
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
    # the version carries the population prior of the users the stream had learned when it was built
    assert json.loads((settings.models_dir / published[-1] / "manifest.json").read_text())["population"]["users"] > 0
    at_rest = train(settings)  # nothing is learned meanwhile: the sums it read are the ones in Redis now
    sums = [keys.unpack_population(b) for p in range(settings.partitions) if (b := rds.get(keys.population(p)))]
    total, n = np.sum([t for t, _ in sums], axis=0), sum(k for _, k in sums)
    prior = np.load(settings.models_dir / at_rest["version"] / PRIOR)
    manifest = json.loads((settings.models_dir / at_rest["version"] / "manifest.json").read_text())
    assert manifest["population"]["users"] == n > 0
    np.testing.assert_allclose(prior, population_prior(total, n, settings.population_strength), atol=1e-6)
    assert np.linalg.norm(prior) > 0
