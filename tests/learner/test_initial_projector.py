"""The user space follows the catalog until the first user is learned, then stays (real Redis and broker)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from privads.infra import keys
from privads.infra.processes import free_port
from privads.infra.records import Ad
from privads.infra.settings import Settings
from privads.infra.store import CatalogStore, connect
from privads.learner.cycle import run_cycle, unscheduled
from privads.ranker.artifacts import CATALOG_FIT, RANDOM_FIT
from privads.ranker.projector import Projector, initial_projector

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=3,
                    api=f"http://127.0.0.1:{free_port()}")


def _store(settings: Settings, first: int, emb: np.ndarray, active: bool = True) -> None:
    ads = [Ad(ad_id=f"ad{first + i}", text=f"ad {first + i}", bid=1.0, active=active) for i in range(len(emb))]
    hashes = [f"h{first + i}" for i in range(len(emb))]

    async def go() -> None:
        r = connect(settings.redis_url)
        try:
            await CatalogStore(r).upsert(ads, hashes, dict(zip(hashes, emb, strict=True)))
        finally:
            await r.aclose()

    asyncio.run(go())


def _projector(manifest: dict) -> Projector:
    return Projector.load(Path(manifest["path"]) / "projector.npz")


def _due(settings: Settings, seen: str | None) -> tuple[str | None, str]:
    return asyncio.run(unscheduled(settings, time.time() + 60, seen))  # drift before now+60: none


def test_the_projector_is_fit_to_the_catalog_until_a_user_is_learned(settings: Settings, rds) -> None:
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((40, 384)) + 4.0 * rng.standard_normal(384)).astype(np.float32)

    empty = asyncio.run(run_cycle(settings, reason="test"))
    assert empty["projector"]["fit"] == RANDOM_FIT and "projector" in empty["changed"]
    np.testing.assert_array_equal(_projector(empty).weight, initial_projector(384, 64, settings.seed).weight)
    assert _due(settings, None) == (None, "0-0")  # nothing in the catalog: nothing to fit

    _store(settings, 0, emb[:30])
    _store(settings, 30, emb[30:], active=False)  # inactive ads are not served: they do not shape the space
    reason, change = _due(settings, None)
    assert reason is None and change != "0-0"  # changed, but not yet seen quiet for one check
    assert _due(settings, change) == ("catalog", change)

    fitted = asyncio.run(run_cycle(settings, reason="catalog"))
    assert fitted["projector"]["fit"] == CATALOG_FIT and "projector" in fitted["changed"]
    want = initial_projector(384, 64, settings.seed, emb[:30])
    np.testing.assert_array_equal(_projector(fitted).weight, want.weight)
    np.testing.assert_array_equal(_projector(fitted).bias, want.bias)
    assert _due(settings, fitted["catalog_change"]) == (None, fitted["catalog_change"])  # the version has it

    # a user is learned (its partition's population sum): the space may no longer move under it
    rds.set(keys.PARTITIONS, settings.partitions)  # as the workers register it
    rds.set(keys.population(1), keys.pack_population(np.full(64, 0.1), 1))
    try:
        _store(settings, 40, rng.standard_normal((10, 384)).astype(np.float32))
        change = _due(settings, None)[1]
        assert _due(settings, change) == (None, change)
        kept = asyncio.run(run_cycle(settings, reason="test"))
        assert kept["projector"]["fit"] == CATALOG_FIT and "projector" not in kept["changed"]
        assert kept["index"]["size"] == 40  # the new ads are served, in the space the user lives in
        np.testing.assert_array_equal(_projector(kept).weight, want.weight)
        manifest = json.loads((Path(kept["path"]) / "manifest.json").read_text())
        assert manifest["population"]["users"] == 1
    finally:
        rds.delete(keys.population(1), keys.PARTITIONS)


def test_users_learned_before_any_version_keep_the_space_they_were_learned_in(settings: Settings, rds) -> None:
    # workers that ran before any version learned users under their default, the seeded random map
    _store(settings, 100, np.random.default_rng(1).standard_normal((20, 384)).astype(np.float32))
    rds.delete(keys.MODEL_CURRENT)
    rds.set(keys.PARTITIONS, settings.partitions)
    rds.set(keys.population(0), keys.pack_population(np.full(64, 0.1), 3))
    try:
        first = asyncio.run(run_cycle(settings, reason="test"))
        assert first["projector"]["fit"] == RANDOM_FIT and first["index"]["size"] >= 20
        np.testing.assert_array_equal(_projector(first).weight, initial_projector(384, 64, settings.seed).weight)
        change = _due(settings, None)[1]
        assert _due(settings, change)[0] is None  # and no catalog cycle moves it later
    finally:
        rds.delete(keys.population(0), keys.PARTITIONS)
