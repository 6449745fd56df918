"""Hostile events and faults the stream worker must ride out (issue 17), against a real broker and redis-server.

An event stamped in milliseconds, a checkpoint whose clock is years ahead, a burst of erasures, a partition count
that does not match the topics', and Redis going away under the catalog agent: each is handled with a clear
reason, and the events around it are counted exactly. This module runs with a 4 s attribution window.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from conftest import REPO, wait_until
from helpers import click, impression, produce, read_topic, sample_ads
from privads.infra import keys, records
from privads.infra.processes import Process, free_port, redis_process, wait_port_free
from privads.infra.settings import Settings
from privads.infra.store import PartitionStore, UserStore

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "coffee & tea"], per_category=3)
WINDOW = 4.0


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, control_share=0.0,
                    catalog=None, seed=7, api=f"http://127.0.0.1:{free_port()}", attribution_window_s=WINDOW,
                    dedupe_horizon_s=6.0)


@pytest.fixture(scope="module")
def catalog(infra, worker: Process, rds: redis.Redis) -> list[dict]:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog agent to store every ad")
    return ADS


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def watermarks(r: redis.Redis, partitions: int) -> list[float]:
    return [float(v.split(b",")[0]) for p in range(partitions)
            for k, v in r.hgetall(keys.checkpoint(p)).items() if k.startswith(b"wm:")]


# one impression in milliseconds is dead-lettered with the reason; the partition clock stays on real time and the
# next user's click is joined in its window, not "late"
def test_an_event_stamped_in_milliseconds_is_dead_lettered_and_learning_goes_on(
        infra, settings: Settings, catalog, rds: redis.Redis) -> None:
    bad_user, user = uid("ms"), uid("after-ms")
    bad = impression(bad_user, catalog[0]["ad_id"])
    bad["ts"] = time.time() * 1000
    produce(infra.kafka, records.IMPRESSIONS, [(bad_user, bad)])

    def lettered() -> list[dict]:
        return [d for d in read_topic(infra.kafka, records.DEAD_LETTER) if bad["event_id"] in d["payload"]]

    letter = wait_until(lettered, 30, "the millisecond event's dead letter")[0]
    assert "ahead" in letter["error"] and "milliseconds" in letter["error"]
    clicks, late = stat(rds, "labelled_clicks"), stat(rds, "late_clicks")
    good = impression(user, catalog[1]["ad_id"])
    produce(infra.kafka, records.IMPRESSIONS, [(user, good)])
    produce(infra.kafka, records.CLICKS, [(user, click(good))])
    wait_until(lambda: stat(rds, "labelled_clicks") == clicks + 1, 30, "the next click to be joined")
    assert stat(rds, "late_clicks") == late
    assert not rds.exists(keys.user(bad_user, settings.partitions))
    assert 0 < max(watermarks(rds, settings.partitions)) <= time.time() + settings.max_event_ahead_s


# a checkpoint whose clock an older version let run to the year 57843 is bounded when read: the next click joins
def test_a_partition_clock_already_years_ahead_heals(infra, settings: Settings, catalog, rds: redis.Redis) -> None:
    future = time.time() * 1000
    for p in range(settings.partitions):
        for topic in records.EVENT_TOPICS:
            rds.hset(keys.checkpoint(p), f"wm:{topic}", f"{future!r},{time.time()!r}")
    user = uid("healed")
    clicks, late = stat(rds, "labelled_clicks"), stat(rds, "late_clicks")
    imp = impression(user, catalog[2]["ad_id"])
    produce(infra.kafka, records.IMPRESSIONS, [(user, imp)])
    produce(infra.kafka, records.CLICKS, [(user, click(imp))])
    wait_until(lambda: stat(rds, "labelled_clicks") == clicks + 1, 30, "the click to be joined in its window")
    assert stat(rds, "late_clicks") == late
    wait_until(lambda: max(watermarks(rds, settings.partitions)) <= time.time() + settings.max_event_ahead_s, 10,
               "the stored clocks to be bounded again")


# hundreds of erasures while events flow: each bumps its user's partition only, the worker's re-plans back off, and
# every event is still counted exactly once; the erased users' pending events are scrubbed by the worker
def test_a_burst_of_erasures_never_stops_the_worker(infra, settings: Settings, catalog, worker: Process,
                                                     rds: redis.Redis) -> None:
    before = stat(rds, "processed:privads.impressions")
    victims = [uid("victim") for _ in range(40)]
    first = [impression(u, catalog[i % len(catalog)]["ad_id"]) for i, u in enumerate(victims)]
    produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in first])
    wait_until(lambda: stat(rds, "processed:privads.impressions") >= before + len(first), 30, "the victims' events")
    sent = len(first)

    async def erase_all(ids: list[str]) -> None:
        r = aioredis.Redis.from_url(infra.redis_url)
        gate = asyncio.Semaphore(50)  # 50 concurrent DELETEs: what a busy API's connection pool allows

        async def one(u: str) -> None:
            async with gate:
                await users.erase(u, time.time())

        try:
            users = UserStore(r, settings.partitions)
            await asyncio.gather(*[one(u) for u in ids])
        finally:
            await r.aclose()

    others = [uid("flow") for _ in range(300)]
    for round_ in range(5):  # events and erasures interleaved: 300 events and 200 erasures per round
        batch = [impression(u, catalog[(i + round_) % len(catalog)]["ad_id"]) for i, u in enumerate(others)]
        produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in batch])
        sent += len(batch)
        asyncio.run(erase_all(victims + [uid("nobody") for _ in range(160)]))
    wait_until(lambda: stat(rds, "processed:privads.impressions") == before + sent, 60,
               "every event of the burst to be processed")
    time.sleep(1.5)  # anything applied twice would show now
    assert stat(rds, "processed:privads.impressions") == before + sent
    assert worker.poll() is None
    wait_until(lambda: not any(rds.zcard(keys.erasing(p)) for p in range(settings.partitions)), 15,
               "the worker to scrub every erased user's pending events")
    pend = [rds.hgetall(keys.pending(p, int(b))) for p in range(settings.partitions)
            for b in rds.smembers(keys.buckets(p))]
    assert not any(v in blob for h in pend for blob in h.values() for v in (u.encode() for u in victims))


# the scrub takes only what came before the erasure: the same id's later events stay pending
def test_the_scrub_keeps_what_came_after_the_erasure(infra, settings: Settings, catalog, rds: redis.Redis) -> None:
    user = uid("again")
    old, new = impression(user, catalog[0]["ad_id"]), impression(user, catalog[1]["ad_id"])
    old["ts"] = time.time() - 1
    produce(infra.kafka, records.IMPRESSIONS, [(user, old)])

    def pending_ids() -> set[str]:
        return {k.decode() for p in range(settings.partitions) for b in rds.smembers(keys.buckets(p))
                for k in rds.hkeys(keys.pending(p, int(b)))}

    wait_until(lambda: old["event_id"] in pending_ids(), 30, "the first impression to wait for its click")

    async def go() -> int:
        r = aioredis.Redis.from_url(infra.redis_url)
        try:
            await UserStore(r, settings.partitions).erase(user, time.time())
            # the scrub the worker runs at its next tick, here at once: it must keep what came after
            new["ts"] = time.time() + 0.5
            produce(infra.kafka, records.IMPRESSIONS, [(user, new)])
            wait_until(lambda: new["event_id"] in pending_ids(), 30, "the later impression")
            return sum([await PartitionStore(r).scrub_erased(p) for p in range(settings.partitions)])
        finally:
            await r.aclose()

    asyncio.run(go())
    ids = pending_ids()
    assert old["event_id"] not in ids and new["event_id"] in ids


# PRIVADS_PARTITIONS above the topics' real count: the worker exits at once with one line naming the counts
def test_a_partition_count_mismatch_stops_the_worker_with_one_line(infra, settings: Settings) -> None:
    wrong = settings.model_copy(update={"partitions": 3})
    env = {**os.environ, **wrong.child_env()}
    done = subprocess.run([sys.executable, "-m", "privads", "worker"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("privads worker: ") and "PRIVADS_PARTITIONS=3" in last
    assert f"{records.IMPRESSIONS} has 2" in last


# Redis away while ads are upserted: the catalog agent retries with backoff and stores every ad once it is back;
# the worker process never exits. Last in the module: it restarts the module's redis-server.
def test_the_catalog_agent_rides_out_redis_going_away(infra, settings: Settings, catalog, worker: Process,
                                                       rds: redis.Redis) -> None:
    more = sample_ads(["travel"], per_category=4)
    port = int(infra.redis_url.rsplit(":", 1)[1].split("/")[0])
    infra.redis.stop(10)
    assert wait_port_free("127.0.0.1", port, 15)
    try:
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in more])
        time.sleep(3)  # the agent fetches them and fails to store them
        assert worker.poll() is None
    finally:
        infra.redis = redis_process(port, infra.data / "redis", infra.data / "logs" / "redis-back.log")
        infra.redis.start(30)
    r = redis.Redis.from_url(infra.redis_url)
    try:
        wait_until(lambda: all(r.exists(keys.ad(a["ad_id"])) for a in more), 60, "the ads fetched while Redis was away")
        assert r.scard(keys.ADS) == len(catalog) + len(more)
        assert worker.poll() is None
    finally:
        r.close()
