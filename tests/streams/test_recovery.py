"""Delivery semantics under failure, on a real broker and redis-server.

* a worker SIGKILLed mid-stream and restarted ends in the same state as an uninterrupted one;
* after a broker restart (the embedded broker keeps nothing) workers recreate topics and carry on;
* after a redis-server restart, AOF has kept the users' state.

The restarts replace the ``infra`` fixture's broker or redis-server in place (``infra.broker``,
``infra.redis``): its teardown stops the ones running then, so a replacement is never left behind.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import redis

from conftest import start_worker, stopping, wait_until
from helpers import click, impression, produce, sample_ads, topic_partitions
from privads.infra import keys, records
from privads.infra.processes import broker_process, redis_process, wait_port_free
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming", "gardening", "skincare"], per_category=6)


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


def states(r: redis.Redis) -> dict[str, tuple]:
    return {k.decode()[len(keys.USER_PREFIX):]: keys.unpack_user(r.get(k))
            for k in r.scan_iter(match=keys.USER_PREFIX + "*", count=1000)}


def variant(settings: Settings, db: int) -> tuple[Settings, redis.Redis]:
    """The same broker and redis-server, another Redis database and consumer group."""
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{db}"
    s = settings.model_copy(update={"redis": url, "worker_group": f"privads-worker-db{db}",
                                    "data": settings.local / f"db{db}"})
    return s, redis.Redis.from_url(url)


def test_sigkill_mid_stream_then_restart_equals_an_uninterrupted_run(infra, settings: Settings) -> None:
    (sa, ra), (sb, rb) = variant(settings, 1), variant(settings, 2)
    # small batches, so that the kill lands mid-stream: a click's half is cheap, 6,000 fit in one default batch
    sa, sb = sa.model_copy(update={"worker_batch": 300}), sb.model_copy(update={"worker_batch": 300})
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    rng = np.random.default_rng(11)
    users = [f"k{i}" for i in range(300)]
    imps = [impression(users[rng.integers(len(users))], ADS[rng.integers(len(ADS))]["ad_id"]) for _ in range(6000)]
    clicks = [click(i) for i in imps for _ in range(int(rng.integers(0, 3)))]  # 0, 1 or 2 (a repeat) per impression
    rng.shuffle(clicks)
    produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps])
    # impressions first, everywhere: then each user's labels follow the clicks topic's order in both runs
    with stopping() as procs:  # every worker started here, the killed one too, stopped whatever fails
        procs.append(start_worker(sa, ra, "worker-a"))
        procs.append(wb := start_worker(sb, rb, "worker-b"))
        for r in (ra, rb):
            wait_until(lambda r=r: stat(r, "impressions") == len(imps), 60, "impressions")
            wait_until(lambda r=r: r.scard(keys.ADS) == len(ADS), 60, "the catalog")
        produce(infra.kafka, records.CLICKS, [(c["user_id"], c) for c in clicks])
        wait_until(lambda: stat(rb, f"processed:{records.CLICKS}") > len(clicks) // 5, 60, "worker B to be mid-stream")
        wb.signal(signal.SIGKILL)
        assert wb.popen is not None
        wb.popen.wait(10)
        killed_at = stat(rb, f"processed:{records.CLICKS}")
        procs.append(start_worker(sb, rb, "worker-b2"))
        for r in (ra, rb):
            wait_until(lambda r=r: stat(r, f"processed:{records.CLICKS}") == len(clicks), 90, "every click")
    assert 0 < killed_at < len(clicks), "the kill did not land mid-stream"
    a, b = states(ra), states(rb)
    assert a.keys() == b.keys() and len(a) > 100
    for u in a:
        np.testing.assert_allclose(a[u][0], b[u][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a[u][1], b[u][1], rtol=1e-6)
        assert a[u][2] == b[u][2]
    clicked = len({c["impression_id"] for c in clicks})
    for r in (ra, rb):
        assert stat(r, "labelled_clicks") == clicked  # no positive lost, none applied twice
        assert stat(r, "repeated_clicks") == len(clicks) - clicked


def test_broker_restart_workers_recreate_topics_and_keep_state(infra, settings: Settings, rds: redis.Redis) -> None:
    s, r = variant(settings, 3)
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    w = start_worker(s, r, "worker-c")
    try:
        wait_until(lambda: r.scard(keys.ADS) == len(ADS), 60, "the catalog")
        imp = impression("survivor", ADS[0]["ad_id"])
        produce(infra.kafka, records.IMPRESSIONS, [("survivor", imp)])
        produce(infra.kafka, records.CLICKS, [("survivor", click(imp))])
        wait_until(lambda: r.exists(keys.user("survivor", settings.partitions)), 30, "the first click to be learned")
        before = keys.unpack_user(r.get(keys.user("survivor", settings.partitions)))

        port = int(infra.kafka.rsplit(":", 1)[1])
        infra.broker.stop(10)
        assert wait_port_free("127.0.0.1", port, 15)
        infra.broker = broker_process(port, infra.data / "logs" / "broker2.log")
        infra.broker.start(30)
        want, seen = settings.partitions, {}

        def recreated() -> bool:
            seen.update(topic_partitions(infra.kafka))
            return all(seen.get(t) == want for t in records.EVENT_TOPICS)

        try:
            wait_until(recreated, 60, "the worker to recreate the topics with their partition counts")
        except BaseException:
            log = (s.data / "logs" / "worker-c.log").read_text(errors="replace").splitlines()
            topic_lines = [line for line in log if "topic" in line and "group_id is None" not in line]
            pytest.fail(f"topics seen {seen}, want {want} each; worker's topic lines: {topic_lines[-15:]}")
        imp2 = impression("survivor", ADS[1]["ad_id"])
        produce(infra.kafka, records.IMPRESSIONS, [("survivor", imp2)])
        produce(infra.kafka, records.CLICKS, [("survivor", click(imp2))])
        survivor = keys.user("survivor", settings.partitions)
        after = wait_until(lambda: (st := keys.unpack_user(r.get(survivor)))[2] == 2 and st, 60,
                           "the click after the restart to be learned on top of the kept state")
        assert not np.allclose(after[0], before[0])
        assert w.poll() is None  # the worker rode it out
    finally:
        w.stop(20)


def test_redis_restart_keeps_user_state_through_aof(infra, settings: Settings) -> None:
    s, r = variant(settings, 4)
    w = start_worker(s, r, "worker-d")
    try:
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: r.scard(keys.ADS) == len(ADS), 60, "the catalog")
        imp = impression("durable", ADS[2]["ad_id"])
        clicks = int(r.hget(keys.STATS, "labelled_clicks") or 0)
        produce(infra.kafka, records.IMPRESSIONS, [("durable", imp)])
        produce(infra.kafka, records.CLICKS, [("durable", click(imp))])
        # the click's half is committed with the click's label (the impression's came first, on its own)
        wait_until(lambda: int(r.hget(keys.STATS, "labelled_clicks") or 0) > clicks, 30, "the click to be learned")
        kept = r.get(keys.user("durable", settings.partitions))
        time.sleep(1.5)  # appendfsync everysec

        port = int(infra.redis_url.rsplit(":", 1)[1].split("/")[0])
        infra.redis.stop(10)
        assert wait_port_free("127.0.0.1", port, 15)
        infra.redis = redis_process(port, infra.data / "redis", infra.data / "logs" / "redis2.log")
        infra.redis.start(30)
        r = redis.Redis.from_url(s.redis_url)
        assert r.get(keys.user("durable", settings.partitions)) == kept
        imp2 = impression("durable", ADS[3]["ad_id"])
        produce(infra.kafka, records.IMPRESSIONS, [("durable", imp2)])
        produce(infra.kafka, records.CLICKS, [("durable", click(imp2))])
        wait_until(lambda: keys.unpack_user(r.get(keys.user("durable", settings.partitions)))[2] == 2, 60,
                   "the worker to reconnect and learn the next click")
        assert w.poll() is None
        assert json.loads(r.hget(keys.WORKERS, next(iter(r.hkeys(keys.WORKERS))))) is not None
    finally:
        w.stop(20)
