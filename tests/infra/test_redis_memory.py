"""Redis' memory ceiling, on a real redis-server (README: Resource limits).

* the embedded redis-server runs with a stated maxmemory and ``noeviction``;
* PrivAds refuses to start against a Redis that evicts keys;
* a full Redis refuses writes: the worker stalls without losing an event, ``DELETE /users`` answers 503 and changes
  nothing, ``/metrics`` shows the pressure; once the ceiling is raised every event is counted exactly once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest
import redis
from redis.exceptions import OutOfMemoryError

from conftest import Infra, start_api, start_worker, stopping, wait_until
from helpers import click, impression, produce, sample_ads
from privads.infra import keys, records
from privads.infra.processes import DEFAULT_REDIS_MAXMEMORY, free_port
from privads.infra.settings import Settings
from privads.infra.store import MemoryUse, connect, memory_pressure, memory_use, refuse_evicting_redis

ADS = sample_ads(["gaming", "gardening"], per_category=4)
MiB = 2**20


# --- the verdicts, on what INFO reports ------------------------------------------------------------


def test_only_noeviction_keeps_state_and_pressure_starts_above_the_threshold() -> None:
    assert MemoryUse(10, 0, "noeviction").pressure() is None  # no ceiling: no share
    assert MemoryUse(90, 100, "noeviction").pressure() is None
    full = MemoryUse(95 * MiB, 100 * MiB, "noeviction").pressure()
    assert full is not None and "95%" in full and "refuses writes" in full
    assert MemoryUse(95, 100, "noeviction").pressure(threshold=0.96) is None
    for policy in ("allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl"):
        use = MemoryUse(1, 0, policy)
        assert use.evicts and policy in (use.pressure() or "") and "noeviction" in (use.pressure() or "")
    assert MemoryUse(1, 2, "noeviction").share == 0.5 and MemoryUse(1, 0, "noeviction").share is None


# --- a real redis-server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(infra: Infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=4,
                    control_share=0.0, api=f"http://127.0.0.1:{free_port()}", archive_every_s=1.0)


def test_the_embedded_redis_has_the_stated_ceiling_and_never_evicts(rds: redis.Redis, settings: Settings) -> None:
    cfg = rds.config_get("maxmemory*")
    assert cfg["maxmemory-policy"] == "noeviction"
    assert DEFAULT_REDIS_MAXMEMORY == Settings.model_fields["redis_maxmemory"].default == "1gb"
    assert int(cfg["maxmemory"]) == 2**30
    use = asyncio.run(_read(settings, memory_use))
    assert use.maxmemory == 2**30 and use.policy == "noeviction" and 0 < use.used < use.maxmemory


async def _read(settings: Settings, fn, url: str | None = None):  # noqa: ANN001, ANN202 - a store function
    r = connect(url or settings.redis_url)
    try:
        return await fn(r)
    finally:
        await r.aclose()


def test_worker_and_api_refuse_to_start_on_an_evicting_redis(rds: redis.Redis, settings: Settings) -> None:
    rds.config_set("maxmemory-policy", "allkeys-lru")
    try:
        env = {**os.environ, **settings.child_env()}
        for role in ("worker", "api"):
            proc = subprocess.run([sys.executable, "-m", "privads", role], env=env, capture_output=True, text=True,
                                  timeout=180)
            out = proc.stdout + proc.stderr
            assert proc.returncode != 0, f"{role} started on an evicting Redis:\n{out[-2000:]}"
            assert "refusing to start: Redis' maxmemory-policy is allkeys-lru" in out, out[-2000:]
        assert "allkeys-lru" in (asyncio.run(_read(settings, memory_pressure)) or "")
    finally:
        rds.config_set("maxmemory-policy", "noeviction")


def test_a_redis_that_denies_info_cannot_be_checked_which_is_logged_not_refused(
        rds: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    rds.acl_setuser("no-info", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"])
    try:
        url = settings.redis_url.replace("redis://", "redis://no-info:pw@")
        assert asyncio.run(_read(settings, refuse_evicting_redis, url)) is None
        assert "cannot read Redis' maxmemory-policy" in caplog.text and "noeviction" in caplog.text
        use = asyncio.run(_read(settings, refuse_evicting_redis))  # a user that may ask: checked, and passed
        assert use is not None and use.policy == "noeviction"
    finally:
        rds.acl_deluser("no-info")


def metric(text: str, name: str) -> float:
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


def test_a_full_redis_stalls_the_worker_without_losing_events_and_erasure_answers_503(
        infra: Infra, settings: Settings, rds: redis.Redis) -> None:
    filler = redis.Redis.from_url(settings.redis_url.rsplit("/", 1)[0] + "/15")
    imps = [impression(f"m{i % 40}", ADS[i % len(ADS)]["ad_id"]) for i in range(200)]
    with stopping() as procs, httpx.Client(base_url=settings.api, timeout=10) as api:
        try:
            procs.append(worker := start_worker(settings, rds))
            procs.append(start_api(settings))
            produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
            wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog")  # impressions learn on its ads
            produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps[:100]])
            wait_until(lambda: stat(rds, f"processed:{records.IMPRESSIONS}") == 100, 60, "the first impressions")
            assert rds.exists(keys.user("m0", settings.partitions))

            # fill it: a ceiling just above what it holds, then filler values until a write is refused
            rds.config_set("maxmemory", rds.info("memory")["used_memory"] + 2 * MiB)
            for n in range(1000):
                try:
                    filler.set(f"filler:{n}", os.urandom(64 * 1024))
                except OutOfMemoryError:
                    break
            else:
                pytest.fail("Redis never refused a write: it evicts instead, or has no ceiling")
            assert filler.dbsize() == n and filler.exists("filler:0")  # nothing evicted to make room
            # and keep it full: freed buffers and expired keys let a full Redis dip under its ceiling now and
            # then, and take a small batch (seen: 100 impressions), which is right but makes the stall a race
            rds.config_set("maxmemory", rds.info("memory")["used_memory"] - MiB)

            clicks = [click(i) for i in imps[100:150]]
            produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps[100:]])
            produce(infra.kafka, records.CLICKS, [(c["user_id"], c) for c in clicks])
            time.sleep(5)  # five of the worker's retries
            assert stat(rds, f"processed:{records.IMPRESSIONS}") == 100, "a batch was committed into a full Redis?"
            assert stat(rds, f"processed:{records.CLICKS}") == 0
            assert worker.poll() is None, "the worker died of a full Redis"
            log = (settings.local / "logs" / "worker.log").read_text(errors="replace")
            assert "used memory > 'maxmemory'" in log  # it stalled for that reason, and said so

            # an erasure is refused whole, with a reason and when to retry: not a 500, and nothing half-done
            before = rds.get(keys.user("m0", settings.partitions))
            r = api.delete("/users/m0")
            assert r.status_code == 503, r.text
            assert r.json()["detail"] == "redis-oom" and "full" in r.json()["error"] and r.headers["Retry-After"]
            assert rds.get(keys.user("m0", settings.partitions)) == before
            assert not rds.exists(keys.erased("m0", settings.partitions))

            text = api.get("/metrics").text
            used = metric(text, "privads_redis_used_memory_bytes")
            ceiling = metric(text, "privads_redis_maxmemory_bytes")
            assert ceiling == int(rds.config_get("maxmemory")["maxmemory"]) and used > 0.9 * ceiling
            assert metric(text, "privads_redis_evicting") == 0
            reason = asyncio.run(_read(settings, memory_pressure))
            assert reason is not None and "refuses writes" in reason
            # reported by the readiness check (which still lets reads serve); its figures are read again, so only
            # the reason's words are compared
            ready = api.get("/readyz").json()["memory_pressure"]
            assert ready is not None and "refuses writes" in ready

            # room again: every event is counted, once
            rds.config_set("maxmemory", DEFAULT_REDIS_MAXMEMORY)
            wait_until(lambda: stat(rds, f"processed:{records.IMPRESSIONS}") == 200
                       and stat(rds, f"processed:{records.CLICKS}") == 50, 60, "every event once Redis has room")
            wait_until(lambda: stat(rds, "labelled_clicks") == 50, 30, "every click joined")
            time.sleep(2)  # a second commit of any batch would show now
            assert stat(rds, f"processed:{records.IMPRESSIONS}") == 200 and stat(rds, "labelled_clicks") == 50
            assert asyncio.run(_read(settings, memory_pressure)) is None
            assert api.get("/readyz").json()["memory_pressure"] is None
            assert api.delete("/users/m0").status_code == 204 and not rds.exists(keys.user("m0", settings.partitions))
        finally:
            rds.config_set("maxmemory", DEFAULT_REDIS_MAXMEMORY)
            filler.flushdb()
            filler.close()
