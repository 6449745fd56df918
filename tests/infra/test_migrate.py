"""An earlier PrivAds' Redis (key layout 1, no hash tags) moved to the current layout, on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from privads.infra import keys
from privads.infra.errors import StartError
from privads.infra.migrate import LAYOUT, holds_old_layout, new_name, refuse_old_layout
from privads.infra.partitioning import owner
from privads.infra.settings import Settings
from privads.infra.store import UserStore, connect

pytestmark = pytest.mark.integration
PARTITIONS = 4


@pytest.fixture
def old(infra) -> Iterator[tuple[str, redis.Redis]]:
    """Database 3 of the module's redis-server, holding what a layout-1 PrivAds wrote."""
    url = infra.redis_url.rsplit("/", 1)[0] + "/3"
    r = redis.Redis.from_url(url)
    r.flushdb()
    try:
        r.set("partitions", PARTITIONS)
        r.set("u:alice", b"alice-state")
        r.set("u:b/ob", b"bob-state")
        r.hset("ckpt:2", mapping={"seq": 5, "off:privads.impressions": 99})
        r.hset("pend:1:7", "imp-1", b"pending")
        r.expire("pend:1:7", 600)
        r.sadd("pb:1", 7)
        r.xadd("arch:0", {"imp": b"row"})
        r.hset("stats", "impressions", 12)
        r.hset("arm:treatment:29000000", "impressions", 3)
        r.expire("arm:treatment:29000000", 3600)
        r.hset("adstat:control:shown", "ad-1", 4)
        r.xadd("adstat:log", {"d": b"{}"})
        r.sadd("arms", "treatment", "control")
        r.hset("ad:ad-1", "text", "an ad")
        r.sadd("ads", "ad-1")
        r.set("emb:h1", b"vec")
        r.set(f"erased:{keys.user_hash('eve')}", "123.0")
        r.zadd("erasures", {keys.user_hash("eve"): 123.0})
        r.set("model:current", "{}")
        yield url, r
    finally:
        r.flushdb()
        r.close()


def test_every_layout_one_key_gets_its_new_name() -> None:
    assert new_name("u:alice", 4) == [keys.user("alice", 4)]
    assert new_name("ckpt:3", 4) == [keys.checkpoint(3)] and new_name("pend:1:-2", 4) == [keys.pending(1, -2)]
    assert new_name("stats", 4) == [keys.STATS] and new_name("adstat:log", 4) == [keys.ADSTAT_LOG]
    assert new_name("adstat:t:shown", 4) == [keys.adstat("t", "shown")]
    assert new_name("armd:t:19000", 4) == [keys.arm("t", 19000, 86400)]
    assert new_name("erased:abc", 2) == ["erased:{0}:abc", "erased:{1}:abc"]
    assert new_name("erasures", 2) == [keys.erasures(0), keys.erasures(1)]
    for current in (keys.user("alice", 4), keys.checkpoint(3), keys.STATS, keys.ADSTAT_LOG, keys.ad("x"),
                    keys.erased("eve", 4), keys.pending(1, 2), "model:current", "workers", LAYOUT):
        assert new_name(current, 4) is None, current  # layout 2 already, or a name that did not change


def test_migrate_redis_moves_every_key_once_and_the_processes_accept_it_then(old, tmp_path) -> None:
    url, r = old
    assert holds_old_layout(r)

    async def refused() -> bool:
        c = connect(url)
        try:
            await refuse_old_layout(c)
            return False
        except StartError as e:
            assert "privads migrate-redis" in str(e)
            return True
        finally:
            await c.aclose()

    assert asyncio.run(refused())
    env = {**os.environ, **Settings(redis=url, data=tmp_path, partitions=PARTITIONS, catalog=None).child_env()}

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-m", "privads", "migrate-redis"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    assert run() == {"renamed": 14, "copied_to_every_partition": 2}
    assert run() == {"renamed": 0, "copied_to_every_partition": 0}  # idempotent
    assert not holds_old_layout(r) and not asyncio.run(refused())
    assert r.get(keys.user("alice", PARTITIONS)) == b"alice-state"
    assert r.get(keys.user("b/ob", PARTITIONS)) == b"bob-state"
    assert r.hget(keys.checkpoint(2), "seq") == b"5" and r.hget(keys.pending(1, 7), "imp-1") == b"pending"
    assert 0 < r.ttl(keys.pending(1, 7)) <= 600 and 0 < r.ttl(keys.arm("treatment", 29000000)) <= 3600
    assert r.hget(keys.STATS, "impressions") == b"12" and r.smembers(keys.ARMS) == {b"treatment", b"control"}
    assert r.hget(keys.adstat("control", "shown"), "ad-1") == b"4" and r.xlen(keys.ADSTAT_LOG) == 1
    assert r.smembers(keys.ADS) == {b"ad-1"} and r.get(keys.embedding("h1")) == b"vec"
    assert r.xlen(keys.archive(0)) == 1 and r.smembers(keys.buckets(1)) == {b"7"}
    # the erasure holds whichever partition the user maps to; the compaction queue waits in every partition
    home = owner(b"eve", PARTITIONS)
    assert all(r.zscore(keys.erasures(p), keys.user_hash("eve")) == 123.0 for p in range(PARTITIONS))

    async def erased() -> list[float | None]:
        c = connect(url)
        try:
            return await UserStore(c, PARTITIONS).erased_at(["eve", "alice"])
        finally:
            await c.aclose()

    assert asyncio.run(erased()) == [123.0, None] and r.exists(keys.erased("eve", PARTITIONS)) and home >= 0
    assert r.get("model:current") == b"{}" and not r.exists("stats", "u:alice", "erasures", "ckpt:2")


def test_migrating_with_another_partition_count_is_refused(old, tmp_path) -> None:
    url, _ = old
    env = {**os.environ, **Settings(redis=url, data=tmp_path, partitions=8, catalog=None).child_env()}
    proc = subprocess.run([sys.executable, "-m", "privads", "migrate-redis"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "PRIVADS_PARTITIONS=4, not 8" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# `privads up` migrates the embedded Redis it owns before any process reads it
def test_the_supervisor_migrates_its_embedded_redis(old, tmp_path) -> None:
    from privads.cli.supervisor import Stack

    url, r = old
    Stack(Settings(data=tmp_path, partitions=PARTITIONS, catalog=None))._migrate(url)
    assert not holds_old_layout(r) and r.get(keys.user("alice", PARTITIONS)) == b"alice-state"
