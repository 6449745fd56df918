"""The stream worker against a real broker and redis-server: catalog, attribution, learning, dead letters."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis

from conftest import wait_until
from helpers import click, impression, produce, read_topic, sample_ads
from infra import keys
from streams import records

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "coffee & tea"], per_category=5)


@pytest.fixture(scope="module")
def catalog(infra, worker, rds: redis.Redis) -> list[dict]:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog agent to store every ad")
    return ADS


def user_state(r: redis.Redis, user_id: str):
    blob = r.get(keys.user(user_id))
    return keys.unpack_user(blob) if blob else None


def test_catalog_agent_stores_ads_with_text_embeddings(catalog, rds: redis.Redis) -> None:
    for ad in catalog:
        h = rds.hgetall(keys.ad(ad["ad_id"]))
        assert h[b"text"].decode() == ad["text"]
        assert float(h[b"bid"]) == pytest.approx(ad["bid"])
        emb = np.frombuffer(rds.get(keys.embedding(h[b"text_hash"].decode())), dtype="<f4")
        assert emb.shape == (384,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)
    # the change log lets readers follow the catalog
    assert rds.xlen(keys.CATALOG_LOG) >= len(catalog)


def test_click_updates_user_embedding_once(infra, catalog, rds: redis.Redis) -> None:
    imp = impression("u-click", catalog[0]["ad_id"])
    produce(infra.kafka, records.IMPRESSIONS, [(imp["user_id"], imp)])
    wait_until(lambda: rds.exists(keys.impression(imp["event_id"])), 30, "the impression to be pending")
    c = click(imp)
    # the same click event twice: applied once
    produce(infra.kafka, records.CLICKS, [(c["user_id"], c), (c["user_id"], c)])
    state = wait_until(lambda: user_state(rds, "u-click"), 30, "the user's state to be written")
    mean, precision, count = state
    time.sleep(2)  # give a double application the chance to happen
    assert user_state(rds, "u-click")[2] == 1
    assert count == 1
    assert np.linalg.norm(mean) > 0.1  # moved from the zero prior toward the clicked ad
    assert (precision >= 16.0).all() and precision.sum() > 16.0 * mean.size


def test_click_before_its_impression_is_joined(infra, catalog, rds: redis.Redis) -> None:
    imp = impression("u-early", catalog[1]["ad_id"])
    c = click(imp)
    before = int(rds.hget(keys.STATS, "clicks_unattributed") or 0)
    produce(infra.kafka, records.CLICKS, [(c["user_id"], c)])
    wait_until(lambda: int(rds.hget(keys.STATS, "clicks_unattributed") or 0) == before + 1, 30,
               "the early click to be counted as unattributed")
    produce(infra.kafka, records.IMPRESSIONS, [(imp["user_id"], imp)])
    state = wait_until(lambda: user_state(rds, "u-early"), 30, "the late-joined positive to be learned")
    assert state[2] == 1
    assert int(rds.hget(keys.STATS, "clicks_unattributed") or 0) == before


def test_bad_messages_go_to_dead_letter_and_good_traffic_flows(infra, catalog, rds: redis.Redis) -> None:
    good = impression("u-good", catalog[2]["ad_id"])
    bad = {
        "not-json": b"{this is not json",
        "array": b"[1, 2]",
        "missing-user": json.dumps({k: v for k, v in impression("x", "a").items() if k != "user_id"}).encode(),
        "bad-propensity": json.dumps(impression("x", "a", propensity=1.5)).encode(),
        "binary": b"\xff\xfe\x00garbage",
    }
    produce(infra.kafka, records.IMPRESSIONS, [("k", v) for v in bad.values()] + [(good["user_id"], good)])
    bad_click = json.dumps({"event_id": "c1", "ts": time.time(), "impression_id": "i", "user_id": "u"}).encode()
    bad_ad = json.dumps({"ad_id": "ad-x", "text": "", "bid": -1}).encode()
    produce(infra.kafka, records.CLICKS, [("u", bad_click)])
    produce(infra.kafka, records.ADS, [("ad-x", bad_ad)])

    def dead() -> list[dict]:
        out = read_topic(infra.kafka, records.DEAD_LETTER)
        return out if len(out) >= len(bad) + 2 else []

    letters = wait_until(dead, 30, "every bad message to reach the dead-letter topic")
    by_payload = {d["payload"]: d for d in letters}
    for d in letters:
        assert {"topic", "partition", "offset", "error", "payload"} <= d.keys()
        assert d["error"]
    assert "not JSON" in by_payload["{this is not json"]["error"]
    assert "JSON object" in by_payload["[1, 2]"]["error"]
    assert "user_id" in by_payload[bad["missing-user"].decode()]["error"]
    assert "propensity" in by_payload[bad["bad-propensity"].decode()]["error"]
    binary = [d for d in letters if d.get("payload_encoding") == "base64"]
    assert binary and binary[0]["topic"] == records.IMPRESSIONS
    assert "ad_id" in by_payload[bad_click.decode()]["error"]
    ad_letter = by_payload[bad_ad.decode()]
    assert ad_letter["topic"] == records.ADS and ("text" in ad_letter["error"] or "bid" in ad_letter["error"])
    # good traffic in the same batch was not lost
    wait_until(lambda: rds.exists(keys.impression(good["event_id"])), 30, "the good impression to be recorded")
    assert not rds.exists(keys.ad("ad-x"))
