"""Serving guard rails and experiments on real infrastructure: arms, the API key, CORS, erasure, Kafka down."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import redis

from conftest import start_api, start_worker, stopping, wait_until
from helpers import produce, read_topic, sample_ads
from privads.infra import keys, records
from privads.infra.processes import free_port
from privads.infra.settings import Settings
from privads.ranker import experiment

pytestmark = pytest.mark.integration
KEY = "s3cret-key"
ADS = sample_ads(["insurance", "coffee & tea", "gaming"], per_category=8, bid=1.0)
assert len(ADS) == 24
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    # half the users in a popularity control, write endpoints behind a key, a fast archive drain
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=3,
                    api=f"http://127.0.0.1:{free_port()}", control_share=0.5, control_policy="popularity",
                    api_key=KEY, archive_every_s=1.0, popularity_refresh_s=0.5)


@pytest.fixture(scope="module")
def client(infra, settings: Settings, rds: redis.Redis):
    # with the key: /recommend needs it too (it logs impressions); the key's own test asks without it
    with stopping() as procs, httpx.Client(base_url=settings.api, timeout=10, headers=AUTH) as c:
        procs.append(start_worker(settings, rds))
        procs.append(start_api(settings))
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: c.get("/healthz").json()["ads"] == len(ADS), 60, "the API to index the catalog")
        yield c


def test_state_changing_endpoints_need_the_key_reads_do_not(settings: Settings, client: httpx.Client) -> None:
    ad = {"text": "trail running shoes", "bid": 1.0}
    with httpx.Client(base_url=settings.api, timeout=10) as anyone:  # no key
        r = anyone.put("/ads/key-ad", json=ad)
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
        assert anyone.put("/ads/key-ad", json=ad, headers={"X-API-Key": "wrong"}).status_code == 401
        assert anyone.delete("/users/someone").status_code == 401
        # /recommend logs impressions (negatives on the user's vector) and shows their personalised ads
        r = anyone.post("/recommend", json={"user_id": "victim", "k": 3})
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
        assert anyone.post("/recommend", json={"user_id": "victim"}, headers={"X-API-Key": "wrong"}).status_code == 401
        served = client.post("/recommend", json={"user_id": "reader", "k": 3})
        assert served.status_code == 200
        a = served.json()["ads"][0]
        click = {"impression_id": a["impression_id"], "user_id": "reader", "ad_id": a["ad_id"]}
        assert anyone.post("/clicks", json=click).status_code == 401
        # one user's explanation shows what their state says: behind the key too
        assert anyone.get("/users/reader/explain").status_code == 401
        assert client.get("/users/reader/explain").json()["user_id"] == "reader"
        # the reads stay open
        for path in ("/model", "/healthz", "/lift", "/lift/series", "/metrics", "/stream", "/serving",
                     "/model/history"):
            assert anyone.get(path).status_code == 200, path
    assert client.put("/ads/key-ad", json=ad).status_code == 200
    assert client.post("/clicks", json=click).status_code == 202


def test_cors_is_off_by_default(client: httpx.Client) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/recommend", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/recommend", json={"user_id": "x"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_arms_split_by_ratio_stay_sticky_and_are_logged(infra, client: httpx.Client) -> None:
    users = [f"arm-user-{i}" for i in range(300)]
    first = {u: client.post("/recommend", json={"user_id": u, "k": 3}).json() for u in users}
    control = [u for u in users if first[u]["policy"] == "control"]
    # 300 users at share 0.5: the control count is within 4 binomial SEs (4·sqrt(300/4) ≈ 35) of 150
    assert abs(len(control) - 150) < 4 * math.sqrt(300 * 0.25)
    for u in users[:60]:  # sticky: the same arm on every request, and the one the pure hash gives
        again = client.post("/recommend", json={"user_id": u, "k": 3}).json()
        assert again["policy"] == first[u]["policy"] == experiment.assign_arm(u, "privads-arm-v1", 0.5)
    # the popularity control is deterministic (propensity 1) and not personalised: two control users asked back
    # to back get the same list (it re-ranks as the arm's counts move, every 0.5 s here, so not across the run)
    assert all(a["propensity"] == 1.0 for u in control for a in first[u]["ads"])
    # the counts move as the worker takes the impressions: a, b, a again, and the pair counts only when a's two
    # lists agree (nothing moved in between); then b's list must be the same
    still = 0
    for a, b in zip(control[0:20:2], control[1:20:2], strict=True):
        la, lb, la2 = (tuple(x["ad_id"] for x in client.post("/recommend", json={"user_id": u, "k": 3}).json()["ads"])
                       for u in (a, b, a))
        if la == la2:
            still += 1
            assert lb == la, (la, lb)
    assert still >= 3, still
    treated = [u for u in users if u not in control]
    assert all(0 < a["propensity"] <= 1 for u in treated for a in first[u]["ads"])
    # every impression carries its arm
    wanted = {first[u]["request_id"]: first[u]["policy"] for u in users[:40]}


    def logged() -> dict[str, str]:
        got = {m["request_id"]: m["policy"] for m in read_topic(infra.kafka, records.IMPRESSIONS)
               if m["request_id"] in wanted}
        return got if len(got) == len(wanted) else {}

    assert wait_until(logged, 30, "the impressions of 40 requests") == wanted
    text = client.get("/metrics").text
    assert 'privads_recommendations_total{policy="control"}' in text
    assert 'privads_recommendations_total{policy="treatment"}' in text


def test_deletion_leaves_no_trace_in_redis(client: httpx.Client, rds: redis.Redis, settings: Settings) -> None:
    user = next(u for u in (f"erase-me-{i}" for i in range(100)) if experiment.assign_arm(u, "privads-arm-v1", 0.5)
                == experiment.TREATMENT)
    body = client.post("/recommend", json={"user_id": user, "k": 5}).json()
    a = body["ads"][0]
    client.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user, "ad_id": a["ad_id"]})
    wait_until(lambda: rds.exists(keys.user(user, settings.partitions)), 30, "the click to be learned")
    needle = user.encode()

    def traces() -> list[str]:
        found = []
        for key in rds.scan_iter(count=1000):
            kind = rds.type(key)
            if needle in key:
                found.append(key.decode())
            elif kind == b"string" and needle in (rds.get(key) or b""):
                found.append(key.decode())
            elif kind == b"hash" and any(needle in k or needle in v for k, v in rds.hgetall(key).items()):
                found.append(key.decode())
            elif kind == b"set" and any(needle in m for m in rds.smembers(key)):
                found.append(key.decode())
            elif kind == b"zset" and any(needle in m for m in rds.zrange(key, 0, -1)):
                found.append(key.decode())
            elif kind == b"stream" and any(needle in v for _, e in rds.xrange(key) for v in e.values()):
                found.append(key.decode())
        return found

    assert traces()  # the check can see the user: its state and its pending impressions mention it
    assert client.delete(f"/users/{user}").status_code == 204
    # the archive stream drains to Parquet within a second or two; everything else goes at once
    left = wait_until(lambda: not traces() or None, 15, "no key or value in Redis to mention the user")
    assert left is True
    # later events for the id start from scratch
    assert len(client.post("/recommend", json={"user_id": user, "k": 5}).json()["ads"]) == 5


def test_recommendations_keep_answering_with_kafka_down_and_drops_are_counted(
        infra, settings: Settings, client: httpx.Client) -> None:
    # a second API whose broker address has nothing behind it; a queue of 25 impressions
    dead = settings.model_copy(update={"kafka": f"127.0.0.1:{free_port()}", "impression_queue": 25,
                                       "api": f"http://127.0.0.1:{free_port()}"})
    api = start_api(dead)
    try:
        with httpx.Client(base_url=dead.api, timeout=10, headers=AUTH) as c:
            wait_until(lambda: c.get("/healthz").json()["ads"] >= len(ADS), 30, "the catalog from Redis")
            users = [u for u in (f"offline-{i}" for i in range(400))
                     if experiment.assign_arm(u, "privads-arm-v1", 0.5) == experiment.TREATMENT][:10]
            for u in users:
                r = c.post("/recommend", json={"user_id": u, "k": 5})
                assert r.status_code == 200 and len(r.json()["ads"]) == 5
            text = c.get("/metrics").text
            depth = float(next(ln.split()[1] for ln in text.splitlines()
                               if ln.startswith("privads_impression_queue_depth")))
            dropped = float(next(ln.split()[1] for ln in text.splitlines()
                                 if ln.startswith("privads_impressions_dropped_total")))
            # 50 impressions into a queue of 25: 25 wait for Kafka, 25 are dropped and counted
            assert depth == 25 and dropped == 25
    finally:
        api.stop(20)


def test_each_arm_learns_only_from_its_own_traffic(client: httpx.Client, rds: redis.Redis) -> None:
    """The popularity control ranks by the control arm's own counts: treatment clicks must not move it."""

    def arm_users(arm: str, n: int, tag: str) -> list[str]:
        return [u for u in (f"{tag}-{i}" for i in range(2000)) if experiment.assign_arm(u, "privads-arm-v1", 0.5)
                == arm][:n]

    def control_list() -> list[str]:  # k = every ad: each probe adds one impression to every ad's count alike
        return [a["ad_id"] for a in client.post("/recommend", json={"user_id": arm_users(
            experiment.CONTROL, 1, "probe")[0], "k": 100}).json()["ads"]]

    def click_target(users: list[str], target: str) -> None:
        for u in users:
            body = client.post("/recommend", json={"user_id": u, "k": 100}).json()  # every ad
            shown = next(a for a in body["ads"] if a["ad_id"] == target)
            r = client.post("/clicks", json={"impression_id": shown["impression_id"], "user_id": u,
                                             "ad_id": target})
            assert r.status_code == 202

    before = control_list()
    target = before[-1]  # the control's last choice
    click_target(arm_users(experiment.TREATMENT, 12, "t-fan"), target)
    wait_until(lambda: int(rds.hget(keys.adstat("treatment", "clicks"), target) or 0) >= 12, 30, "the treatment clicks")
    time.sleep(3)  # the API follows the counts within about a second and re-ranks the control every 0.5 s
    after = control_list()
    # 12 clicks in the treatment did not lift the ad in the control: it is still among the control's last
    assert after.index(target) >= len(after) - 3 and rds.hget(keys.adstat("control", "clicks"), target) is None
    # the same clicks from control users: now the control's own evidence puts the ad on top
    click_target(arm_users(experiment.CONTROL, 12, "c-fan"), target)
    assert wait_until(lambda: control_list()[0] == target, 30, "the control to rank the ad it saw clicked")
