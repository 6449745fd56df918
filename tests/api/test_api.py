"""The API end to end: HTTP → Kafka → stream worker → Redis → HTTP, on real infrastructure."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from conftest import wait_until
from helpers import produce, read_topic, sample_ads
from privads.infra import keys, records
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
CATEGORIES = ["insurance", "coffee & tea", "gaming"]
# equal bids, so that what moves the ranking is the user's learned interest, not money
ADS = sample_ads(CATEGORIES, per_category=10, bid=1.0)
CATEGORY = {a["ad_id"]: a["category"] for a in ADS}


@pytest.fixture(scope="module")
def client(infra, api: httpx.Client) -> httpx.Client:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: api.get("/healthz").json()["ads"] == len(ADS), 60, "the API to index the catalog")
    return api


def recommend(client: httpx.Client, user_id: str, k: int = 10) -> dict:
    r = client.post("/recommend", json={"user_id": user_id, "k": k, "context": {"page": "home"}})
    assert r.status_code == 200, r.text
    return r.json()


def share(body: dict, category: str) -> float:
    return sum(CATEGORY[a["ad_id"]] == category for a in body["ads"]) / len(body["ads"])


def test_recommend_answers_per_contract_and_logs_impressions(infra, client: httpx.Client) -> None:
    body = recommend(client, "new-user-1", k=5)
    assert body["policy"] == "treatment" and body["request_id"]
    assert body["model_version"] is None or isinstance(body["model_version"], str)
    ads = body["ads"]
    assert [a["position"] for a in ads] == [0, 1, 2, 3, 4]
    assert len({a["ad_id"] for a in ads}) == 5 and {a["ad_id"] for a in ads} <= set(CATEGORY)
    assert all(0 < a["propensity"] <= 1 and a["score"] >= 0 for a in ads)
    assert all(ads[i]["score"] >= ads[i + 1]["score"] for i in range(4))

    def logged() -> list[dict]:
        mine = [m for m in read_topic(infra.kafka, records.IMPRESSIONS) if m["request_id"] == body["request_id"]]
        return mine if len(mine) == 5 else []

    imps = wait_until(logged, 30, "one impression per returned ad in privads.impressions")
    by_id = {i["event_id"]: i for i in imps}
    for a in ads:
        imp = by_id[a["impression_id"]]
        assert (imp["ad_id"], imp["position"], imp["user_id"]) == (a["ad_id"], a["position"], "new-user-1")
        assert imp["propensity"] == pytest.approx(a["propensity"]) and imp["policy"] == "treatment"
        assert 0 < imp["pctr"] < 1  # the served model's prediction, which the ad's calibration factor sums
        assert imp["context"] == {"page": "home"}


def test_clicking_one_kind_of_ad_gets_more_of_it(client: httpx.Client) -> None:
    user, target = "dana", "gaming"
    before = sum(share(recommend(client, user), target) for _ in range(10)) / 10
    for _ in range(6):
        body = recommend(client, user)
        for a in body["ads"]:
            if CATEGORY[a["ad_id"]] == target:
                r = client.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user,
                                                 "ad_id": a["ad_id"]})
                assert r.status_code == 202, r.text
        time.sleep(1.0)
    after = sum(share(recommend(client, user), target) for _ in range(10)) / 10
    assert before < 0.6, f"a cold user should see a mix (target share {before:.2f})"
    assert after >= 0.8, f"after clicking {target} ads the share is only {after:.2f} (was {before:.2f})"


def test_unknown_users_get_a_cold_start_answer(client: httpx.Client) -> None:
    for i in range(5):
        assert len(recommend(client, f"never-seen-{i}", k=3)["ads"]) == 3


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("post", "/recommend", {"user_id": "u", "k": 0}, "k"),
    ("post", "/recommend", {"user_id": "u", "k": 101}, "k"),
    ("post", "/recommend", {"user_id": "u", "k": "ten"}, "k"),
    ("post", "/recommend", {"k": 3}, "user_id"),
    ("post", "/recommend", {"user_id": "", "k": 3}, "user_id"),
    ("post", "/recommend", {"user_id": "x" * 129}, "user_id"),
    ("post", "/recommend", {"user_id": 42}, "user_id"),
    ("post", "/recommend", {"user_id": "u", "context": [1]}, "context"),
    ("post", "/clicks", {"user_id": "u", "ad_id": "a"}, "impression_id"),
    ("post", "/clicks", {"impression_id": "i", "user_id": "u", "ad_id": "a", "value": -1}, "value"),
    ("put", "/ads/a1", {"text": "", "bid": 1}, "text"),
    ("put", "/ads/a1", {"text": "boots", "bid": -0.5}, "bid"),
    ("put", "/ads/a1", {"text": "boots"}, "bid"),
])
def test_bad_bodies_get_422_naming_the_field(client: httpx.Client, method: str, path: str, body: dict,
                                              field: str) -> None:
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert field in [f["field"] for f in err["fields"]] and field in err["error"]


def test_malformed_json_and_bad_query_are_4xx(client: httpx.Client) -> None:
    r = client.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    r = client.get("/lift", params={"window": -5})
    assert r.status_code == 422 and "window" in r.json()["error"]
    assert client.get("/no-such-route").status_code == 404


def test_put_ad_becomes_recommendable(client: httpx.Client) -> None:
    # asked before the ad exists: the candidates computed for this (unknown) user must not outlive the upsert
    assert all(a["ad_id"] != "fresh-ad" for a in recommend(client, "fresh-ad-fan", k=31)["ads"])
    start = time.monotonic()
    r = client.put("/ads/fresh-ad", json={"text": "handmade ceramic pour-over coffee dripper, eco-friendly",
                                          "bid": 1.0, "category": "coffee & tea"})
    assert r.status_code == 200 and r.json()["ad_id"] == "fresh-ad"
    wait_until(lambda: client.get("/healthz").json()["ads"] == len(ADS) + 1, 30, "the new ad to be indexed")
    print(f"PUT /ads → indexed in {time.monotonic() - start:.2f}s")

    def shown() -> bool:
        return any(a["ad_id"] == "fresh-ad" for a in recommend(client, "fresh-ad-fan", k=31)["ads"])

    wait_until(shown, 10, "the new ad to be recommended")


def test_delete_user_erases_learned_state(client: httpx.Client, rds: redis.Redis, settings: Settings) -> None:
    user = "erin"
    body = recommend(client, user)
    a = body["ads"][0]
    client.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user, "ad_id": a["ad_id"]})
    wait_until(lambda: rds.exists(keys.user(user, settings.partitions)), 30, "the click to be learned")
    r = client.delete(f"/users/{user}")
    assert r.status_code == 204
    assert not rds.exists(keys.user(user, settings.partitions))
    assert len(recommend(client, user)["ads"]) == 10


def test_health_model_lift_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    model = client.get("/model").json()
    assert model["index"]["type"] == "Flat" and model["index"]["size"] >= len(ADS)
    assert model["projector"]["d_in"] == 384 and model["projector"]["d_out"] == 64
    assert model["privacy"] == {"differential_privacy": False, "pseudonymous_ids": True, "pii_in_models": False}
    # the clicks of this module were scored before they were learned (prequential quality watch)
    quality = wait_until(lambda: (q := client.get("/model").json()["quality"])["examples"] > 0 and q, 20,
                         "the workers to publish prediction quality")
    # clicks only so far (negatives settle when their 30-minute window closes): no AUC nor log-loss of one outcome
    assert quality["auc"] is None and quality["log_loss"] is None and quality["drifts"] >= 0
    lift = client.get("/lift", params={"window": 3600}).json()
    t = lift["arms"]["treatment"]
    assert t["impressions"] > 0 and 0 <= t["ci95"][0] <= t["ctr"] <= t["ci95"][1] <= 1
    assert lift["lift"] is None  # no control traffic in this module (control_share = 0)
    text = client.get("/metrics").text
    assert 'privads_request_seconds_bucket{le="0.01",method="POST",route="/recommend",status="200"}' in text
    assert 'privads_events_processed_total{topic="privads.clicks"}' in text
    assert "privads_impressions_dropped_total 0.0" in text
    # Prometheus' conventions: counters typed counter (with _total), units in the names
    for counter in ("privads_events_processed", "privads_impressions_dropped", "privads_drift",
                    "privads_dead_letters", "privads_recommendations"):
        assert f"# TYPE {counter}_total counter" in text or f"# TYPE {counter} counter" in text, counter
        assert f"{counter}_total" in text, counter
    inf = 'privads_freshness_seconds_bucket{le="+Inf"}'
    assert "# TYPE privads_freshness_seconds histogram" in text and inf in text
    clicks = sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(inf))
    assert clicks > 0  # the clicks of this module, each timed from its production to its user's update
    assert "privads_model_built_timestamp_seconds" in text and "privads_index_ads" in text
    lag = wait_until(lambda: 'privads_consumer_lag_messages{topic="privads.clicks"}' in client.get("/metrics").text,
                     20, "the consumer lag metric")
    assert lag
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/clicks", "/ads/{ad_id}", "/users/{user_id}", "/lift", "/model", "/healthz",
            "/metrics"} <= set(spec["paths"])
