"""Redis readers against a real redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from infra import keys
from infra.store import Counters, connect
from streams.updates import ad_posterior

pytestmark = pytest.mark.integration


# the per-ad counts the workers keep feed the Beta posterior; unknown ads read as zero (the prior)
def test_ad_counts_feed_the_beta_posterior(infra, rds: redis.Redis) -> None:
    rds.hset(keys.adstat("treatment", "clicks"), mapping={"ad-1": 3})
    rds.hset(keys.adstat("treatment", "labelled"), mapping={"ad-1": 10, "ad:2": 4})
    rds.hset(keys.adstat("control", "clicks"), mapping={"ad-1": 1})
    rds.hset(keys.adstat("control", "labelled"), mapping={"ad-1": 50})

    async def read() -> tuple[np.ndarray, np.ndarray]:
        r = connect(infra.redis_url)
        try:
            assert await Counters(r).all_ad_counts("treatment") == {"ad-1": (3, 10), "ad:2": (0, 4)}
            return await Counters(r).ad_counts("treatment", ["ad-1", "never-shown"])
        finally:
            await r.aclose()

    clicks, labelled = asyncio.run(read())
    assert clicks.tolist() == [3, 0] and labelled.tolist() == [10, 0]
    a, b = ad_posterior(clicks, labelled, base_rate=0.05, strength=20.0)
    assert a.tolist() == [4.0, 1.0] and b.tolist() == [26.0, 19.0]
