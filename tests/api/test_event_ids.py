"""Event ids stay unique across API processes that share a seed (they would otherwise be deduplicated away)."""

from __future__ import annotations

import httpx
import pytest
import redis

from conftest import start_api
from privads.infra import signing
from privads.infra.processes import free_port
from privads.infra.secret import IMPRESSION_SECRET
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration


def test_same_seed_processes_never_reuse_request_or_impression_ids(infra, settings: Settings,
                                                                   rds: redis.Redis) -> None:
    ids = []
    for _ in range(2):  # two processes, the same seed: like a restart, or two replicas
        s = settings.model_copy(update={"api": f"http://127.0.0.1:{free_port()}"})
        p = start_api(s)
        try:
            r = httpx.post(f"{s.api}/recommend", json={"user_id": "u", "k": 3}, timeout=10)
            # no catalog here, so no impression to click: an id signed as the API signs them stands in for one
            # (both processes read the one secret from Redis, so either takes the other's ids too)
            iid = signing.sign(rds.get(IMPRESSION_SECRET), "i", "u", "a")
            c = httpx.post(f"{s.api}/clicks", json={"impression_id": iid, "user_id": "u", "ad_id": "a"}, timeout=10)
            assert r.status_code == 200 and c.status_code == 202, c.text
            ids.append((r.json()["request_id"], c.json()["event_id"]))
        finally:
            p.stop(20)
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]
