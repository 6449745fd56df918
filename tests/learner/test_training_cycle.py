"""A learner cycle trains on the archive, promotes a better projector and rejects a worse one (real Redis, broker)."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from conftest import start_api, wait_until
from privads.infra import keys
from privads.infra.processes import free_port
from privads.infra.records import Ad, Labelled, pack_served
from privads.infra.settings import Settings
from privads.infra.store import CatalogStore, connect
from privads.learner.cycle import run_cycle
from privads.learner.train import train_projector
from privads.ranker.artifacts import load_evidence
from privads.ranker.projector import Projector, initial_projector
from privads.ranker.updates import logit, sigmoid
from privads.streams import archive

pytestmark = pytest.mark.integration
N_ADS, N_USERS, N_IMPS = 300, 1500, 24_000


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=7,
                    api=f"http://127.0.0.1:{free_port()}", attribution_window_s=60.0)


@pytest.fixture(scope="module")
def world(settings: Settings, rds) -> Projector:
    """Ads, users and an archive whose clicks follow a hidden projection of the ads' text embeddings."""
    rng = np.random.default_rng(0)
    truth = Projector(rng.standard_normal((384, 64)).astype(np.float32), np.zeros(64, np.float32))
    # like real ad texts, embeddings cluster by topic (the sample catalog's 20 categories separate cleanly)
    topics = rng.standard_normal((20, 384)).astype(np.float32)
    emb = topics[rng.integers(0, 20, N_ADS)] + 0.3 * rng.standard_normal((N_ADS, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    users = (1.5 * rng.standard_normal((N_USERS, 64))).astype(np.float32)  # u·p has std 1.5: a learnable signal
    ads = [Ad(ad_id=f"ad{i}", text=f"ad number {i}", bid=1.0) for i in range(N_ADS)]

    async def store() -> None:
        r = connect(settings.redis_url)
        try:
            await CatalogStore(r).upsert(ads, [f"h{i}" for i in range(N_ADS)], {f"h{i}": emb[i] for i in range(N_ADS)})
        finally:
            await r.aclose()

    asyncio.run(store())
    for u in range(N_USERS):
        rds.set(keys.user(f"u{u}", settings.partitions), keys.pack_user(users[u], np.full(64, 16.0, np.float32), 5))
    ui, ai = rng.integers(0, N_USERS, N_IMPS), rng.integers(0, N_ADS, N_IMPS)
    p = sigmoid((users[ui] * truth.project(emb[ai])).sum(1) + logit(settings.base_rate))
    clicked = rng.random(N_IMPS) < p
    t0 = 1_795_000_000.0
    lines, labels = [], []
    packed = [pack_served(v) for v in users]  # the users as served: fixed in this world
    for i in range(N_IMPS):
        imp = {"event_id": f"i{i}", "ts": t0 + i * 0.1, "user_id": f"u{ui[i]}", "ad_id": f"ad{ai[i]}",
               "position": 0, "propensity": 0.1, "policy": "treatment", "request_id": f"r{i}",
               "user_mean": packed[ui[i]], "user_count": 5}
        lines.append(json.dumps(imp).encode())
        if clicked[i]:
            labels.append(Labelled(impression_id=f"i{i}", user_id=imp["user_id"], ad_id=imp["ad_id"],
                                   ts=imp["ts"], clicked=True, policy="treatment"))
    archive.write_chunk(Path(settings.local) / "archive", 0, "1_0",
                        [(b"1-0", {b"imp": b"\n".join(lines), b"lab": msgspec.msgpack.encode(labels)})])
    return truth


def test_a_better_projector_is_promoted_and_a_worse_one_rejected(settings: Settings, world: Projector) -> None:
    good = functools.partial(train_projector, epochs=8, lr=0.01, anchor=0.0)
    first = asyncio.run(run_cycle(settings, reason="test", trainer=good))
    ev = first["evaluation"]["projector"]
    assert ev["trained"] and ev["promoted"], ev
    assert ev["candidate"]["auc"] > ev["served"]["auc"] + 0.1  # learned the hidden projection
    assert "projector" in first["changed"]
    # another model, so its own view of the ads' evidence: the window's clicks against its predictions (no live
    # counts in this world, so the offsets are the whole evidence)
    assert first["evaluation"]["evidence"]["rebuilt"]
    offsets = load_evidence(Path(first["path"]))
    assert offsets is not None and offsets["treatment"] and not offsets.get("control")
    clicks = sum(c for c, _ in offsets["treatment"].values())
    expected = sum(e for _, e in offsets["treatment"].values())
    assert 0 < clicks < N_IMPS and 0 < expected < N_IMPS
    promoted = Projector.load(Path(first["path"]) / "projector.npz")
    assert not np.array_equal(promoted.weight, initial_projector(384, 64, settings.seed).weight)

    def worse(*_: object, **__: object) -> Projector:  # a candidate that forgot everything
        return initial_projector(384, 64, seed=999)

    second = asyncio.run(run_cycle(settings, reason="test", trainer=worse))
    # beside the gate's scores: off-policy estimates of the new and of the served version on the held-out
    # treatment requests (they logged propensities), and the on-policy CTR, in the manifest on disk too
    ope = second["evaluation"]["off_policy"]
    assert ope["requests"] == 500 and 0 < ope["on_policy_ctr"] < 1, ope
    for name in ("candidate", "served"):
        for est in ("snips", "dr"):
            r = ope[name][est]
            assert r["ci_lo"] <= r["estimate"] <= r["ci_hi"], (name, est, r)
    on_disk = json.loads((Path(second["path"]) / "manifest.json").read_text())
    assert on_disk["evaluation"]["off_policy"] == ope
    ev2 = second["evaluation"]["projector"]
    assert ev2["trained"] and not ev2["promoted"] and "AUC" in ev2["reason"], ev2
    assert "projector" not in second["changed"]
    kept = Projector.load(Path(second["path"]) / "projector.npz")
    np.testing.assert_array_equal(kept.weight, promoted.weight)  # the served projector stayed


def test_the_api_serves_the_learned_ranker(settings: Settings, world: Projector) -> None:
    manifest = asyncio.run(run_cycle(settings, reason="test"))
    ev = manifest["evaluation"]["ranker"]
    assert ev["trained"], ev
    assert set(ev["baselines"]) == {"logistic", "popularity"} and ev["candidate"]["ndcg_at_10"] is not None
    assert manifest["evaluation"]["click_recall_at_500"] is not None
    served_kind = manifest["ranker"]["type"]
    assert served_kind in ("dcn", "logistic", "thompson-logistic")
    assert (Path(manifest["path"]) / "ranker.npz").exists() == (served_kind != "thompson-logistic")
    api = start_api(settings)
    try:
        with httpx.Client(base_url=settings.api, timeout=10) as c:
            wait_until(lambda: c.get("/model").json()["version"] == manifest["version"], 30, "the API to load it")
            assert c.get("/model").json()["ranker"]["type"] == served_kind
            r = c.post("/recommend", json={"user_id": "u1", "k": 5, "context": {"device": "mobile", "hour": 9}})
            assert r.status_code == 200, r.text
            ads = r.json()["ads"]
            assert len(ads) == 5 and all(0 < a["propensity"] <= 1 for a in ads)
            assert [a["score"] for a in ads] == sorted((a["score"] for a in ads), reverse=True)
    finally:
        api.stop(20)
