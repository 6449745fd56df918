"""Event ids stay unique across API processes that share a seed (they would otherwise be deduplicated away)."""

from __future__ import annotations

import httpx
import pytest

from conftest import start_api
from privads.infra.processes import free_port
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration


def test_same_seed_processes_never_reuse_request_or_impression_ids(infra, settings: Settings) -> None:
    ids = []
    for _ in range(2):  # two processes, the same seed: like a restart, or two replicas
        s = settings.model_copy(update={"api": f"http://127.0.0.1:{free_port()}"})
        p = start_api(s)
        try:
            r = httpx.post(f"{s.api}/recommend", json={"user_id": "u", "k": 3}, timeout=10)
            c = httpx.post(f"{s.api}/clicks", json={"impression_id": "i", "user_id": "u", "ad_id": "a"}, timeout=10)
            assert r.status_code == 200 and c.status_code == 202
            ids.append((r.json()["request_id"], c.json()["event_id"]))
        finally:
            p.stop(20)
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]
