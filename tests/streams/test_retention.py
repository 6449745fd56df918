"""Redis stays bounded in a long run with many distinct users: idle users are forgotten, arm counters expire.

A real broker, redis-server and worker; waves of users who each see a few ads once and never come back, with
``USER_IDLE_S`` short. Without expiry every wave would add its users' keys for good.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from conftest import Infra, start_worker, wait_until
from helpers import impression, produce, sample_ads
from privads.infra import keys, records
from privads.infra.processes import Process
from privads.infra.settings import Settings
from privads.infra.store import PROCESS_ENTRY_TTL_S, WorkerRegistry, connect

pytestmark = pytest.mark.integration
IDLE_S = 3.0
WAVE = 400
ADS = sample_ads(["gaming"], per_category=4)


@pytest.fixture(scope="module")
def settings(infra: Infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=1,
                    control_share=0.0, user_idle_s=IDLE_S, attribution_window_s=1.0, dedupe_horizon_s=0.0)


@pytest.fixture(scope="module")
def worker(settings: Settings, rds: redis.Redis, infra: Infra) -> Iterator[Process]:
    p = start_worker(settings, rds)
    try:
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog")
        yield p
    finally:
        p.stop(20)


def user_keys(r: redis.Redis) -> list[bytes]:
    return list(r.scan_iter(match=keys.USER_PREFIX + "*", count=1000))


def test_idle_users_are_forgotten_and_the_population_sum_follows(infra: Infra, rds: redis.Redis,
                                                                 worker: Process) -> None:
    waves, peak = 6, 0
    base = rds.info("memory")["used_memory"]
    for w in range(waves):
        learned = int(rds.hget(keys.STATS, "learned_impressions") or 0)
        imps = [impression(f"w{w}-u{i}", ADS[i % len(ADS)]["ad_id"]) for i in range(WAVE)]
        produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps])
        wait_until(lambda n=learned: int(rds.hget(keys.STATS, "learned_impressions") or 0) >= n + WAVE, 60,
                   f"wave {w} learned")
        peak = max(peak, len(user_keys(rds)))
        # the stated bound (README, Privacy and security): 2 KiB per user held (state, key, idle index) plus 512 KiB
        # for what one wave leaves in flight (its archive stream until drained, pending buckets); measured: 0.76 MB
        # after the first wave, then 1.2-1.5 MB with 800 users held. With USER_IDLE_S = 1e9 the memory stays within
        # the per-user bound too, but the users held reach 2,400: the count check below is what fails then
        grown = rds.info("memory")["used_memory"] - base
        assert grown <= len(user_keys(rds)) * 2048 + 512 * 1024, (w, grown)
        time.sleep(IDLE_S / 2)
    # every wave's users were learned, and no more than the last waves' (those within USER_IDLE_S) are held: one
    # wave's batches forget the users idle since before it, so at most this wave and the one before it remain
    assert peak <= 2 * WAVE, peak
    # one snapshot (a MULTI) of the users' states, the population sums and the idle index: the worker goes on
    # forgetting idle users meanwhile, so reads spread over time would compare different moments
    scanned = user_keys(rds)
    pipe = rds.pipeline(transaction=True)
    for k in scanned:
        pipe.get(k)
    for p in range(2):
        pipe.get(keys.population(p))
    for p in range(2):
        pipe.zrange(keys.seen(p), 0, -1)
    res = pipe.execute()
    states = {keys.user_id_of(k): v for k, v in zip(scanned, res, strict=False) if v is not None}  # None: forgotten
    pops = [keys.unpack_population(b) for b in res[len(scanned):len(scanned) + 2]]
    seen = {u.decode() for members in res[len(scanned) + 2:] for u in members}
    held = set(states)
    assert held and all(u.startswith((f"w{waves - 1}-", f"w{waves - 2}-")) for u in held), sorted(held)[:5]
    # the population sums hold exactly the users that are left: their count and the sum of their means
    assert sum(n for _, n in pops) == len(held)
    means = np.sum([keys.unpack_user(v)[0] for v in states.values()], axis=0)
    np.testing.assert_allclose(sum(t for t, _ in pops), means, atol=1e-3)
    # the idle index names only the users that are held
    assert seen == held
    # arm counters, per minute, hour and day, each expire after its span's life
    for prefix, ttl in keys.ARM_SPANS.values():
        arms = list(rds.scan_iter(match=f"{prefix}:*"))
        assert arms and all(0 < rds.ttl(k) <= ttl for k in arms), prefix


def test_per_process_entries_of_workers_gone_for_a_day_are_dropped(settings: Settings, rds: redis.Redis,
                                                                     worker: Process) -> None:
    now = time.time()
    rds.hset(keys.WORKERS, "gone-1", json.dumps({"ts": now - 2 * PROCESS_ENTRY_TTL_S, "partitions": 1, "lag": {}}))
    rds.hset(keys.QUALITY, "gone-1", json.dumps({"ts": now - 2 * PROCESS_ENTRY_TTL_S, "examples": 3}))
    rds.hset(keys.QUALITY, "junk", b"not json")
    rds.hset(keys.WORKERS, "recent", json.dumps({"ts": now - 60, "partitions": 0, "lag": {}}))

    async def prune() -> int:
        r = connect(settings.redis_url)
        try:
            return await WorkerRegistry(r).prune(now)
        finally:
            await r.aclose()

    assert asyncio.run(prune()) == 3
    assert set(rds.hkeys(keys.WORKERS)) >= {b"recent"} and not rds.hexists(keys.WORKERS, "gone-1")
    assert not rds.hexists(keys.QUALITY, "gone-1") and not rds.hexists(keys.QUALITY, "junk")
    # the live worker's own entries stay
    assert any(json.loads(v)["ts"] > now - 60 for k, v in rds.hgetall(keys.WORKERS).items() if k != b"recent")
