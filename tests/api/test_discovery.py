"""A new ad at an ordinary bid is discovered in a live loop (issue 14): real broker, redis-server, worker and API.

The catalog: 30 ads of one category at bid 3 that nobody clicks, and one new ad of another category at bid 1 that
users click half the time it is shown. Retrieval keeps 8 candidates, so at first the new ad cannot even be
retrieved (bid order). As the pricey category is shown and not clicked, its pooled factor sinks, the keys follow,
the new ad is retrieved, shown, clicked, and rises to the top.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import redis

from conftest import start_api, start_worker, stopping, wait_until
from helpers import produce, sample_ads
from privads.infra import records
from privads.infra.processes import free_port
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
PRICEY = sample_ads(["gaming"], per_category=30, bid=3.0)
NEW = {"ad_id": "new-good-ad", "text": "organic fair-trade coffee beans, freshly roasted", "bid": 1.0,
       "category": "discovery-test", "active": True, "ts": 1.0}


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=5,
                    api=f"http://127.0.0.1:{free_port()}", control_share=0.0, candidates=8)


def test_a_cold_ad_with_an_ordinary_bid_and_a_high_ctr_is_shown_and_rises(infra, settings: Settings,
                                                                            rds: redis.Redis) -> None:
    with stopping() as procs:
        procs.append(start_worker(settings, rds))
        procs.append(start_api(settings))
        with httpx.Client(base_url=settings.api, timeout=10) as c:
            produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in [*PRICEY, NEW]])
            wait_until(lambda: c.get("/healthz").json()["ads"] == len(PRICEY) + 1, 60, "the API to index the catalog")
            rng = np.random.default_rng(0)
            shown_at: list[int | None] = []
            for _ in range(900):
                user = f"discovery-user-{rng.integers(200)}"
                body = c.post("/recommend", json={"user_id": user, "k": 3}).json()
                ids = [a["ad_id"] for a in body["ads"]]
                shown_at.append(ids.index(NEW["ad_id"]) if NEW["ad_id"] in ids else None)
                for a in body["ads"]:
                    if a["ad_id"] == NEW["ad_id"] and rng.random() < 0.5:
                        assert c.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user,
                                                       "ad_id": a["ad_id"]}).status_code == 202
    first, last = shown_at[:50], shown_at[-300:]
    share = lambda part: sum(p is not None for p in part) / len(part)  # noqa: E731
    top = sum(p == 0 for p in last) / len(last)
    # not retrievable at first (bid order keeps it out of the 8 candidates: seen here, 0 of the first 50
    # requests and 4 of the next 50); shown in most of the last requests, and first in many of them
    assert share(first) < 0.1, share(first)
    assert share(last) > 0.8 and top > 0.4, (share(last), top)
