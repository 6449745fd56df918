"""Feedback that cannot be forged and input that cannot grow without bound, on a real API, broker and Redis.

* ``POST /clicks`` takes only an impression id that ``POST /recommend`` signed for that user and ad
  (``infra.signing``): a made-up id, another user's impression or another ad's is refused, nothing is
  produced, and no counter or user vector moves (checked after a real click in the same window was learned).
* Bodies over ``PRIVADS_MAX_BODY_BYTES`` get 413 before they are parsed (declared or chunked); ``context``
  over its limits, and ``/lift`` windows over 366 days, get 422 naming the limit.
* The API refuses to listen beyond loopback without ``PRIVADS_API_KEY``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis

from conftest import start_api, wait_until
from helpers import counters, moved, produce, read_topic, sample_ads
from privads.api.server import is_loopback
from privads.infra import keys, records
from privads.infra.processes import free_port
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "coffee & tea", "gaming"], per_category=4, bid=1.0)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def client(infra, api: httpx.Client) -> httpx.Client:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: api.get("/healthz").json()["ads"] == len(ADS), 60, "the API to index the catalog")
    return api


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


def state(r: redis.Redis, user_id: str, partitions: int) -> tuple | None:
    blob = r.get(keys.user(user_id, partitions))
    return keys.unpack_user(blob) if blob else None


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- forged clicks -----------------------------------------------------------------------------


def test_forged_clicks_are_refused_and_change_no_counter_and_no_vector(infra, client: httpx.Client,
                                                                      rds: redis.Redis, settings: Settings) -> None:
    victim, mallory, witness = uid("victim"), uid("mallory"), uid("witness")
    served = stat(rds, "impressions")
    shown = client.post("/recommend", json={"user_id": victim, "k": 5}).json()["ads"]
    seen = client.post("/recommend", json={"user_id": witness, "k": 5}).json()["ads"]
    other_ad = next(a["ad_id"] for a in ADS if a["ad_id"] != shown[0]["ad_id"])
    wait_until(lambda: stat(rds, "impressions") == served + 10, 30, "the ten impressions to be learned")
    victim_before = state(rds, victim, settings.partitions)
    before = counters(rds)
    mine = shown[0]
    rid, mac = mine["impression_id"].rsplit(".", 1)
    forged = {
        "another user's impression": {"impression_id": mine["impression_id"], "user_id": mallory,
                                      "ad_id": mine["ad_id"]},
        "another ad": {"impression_id": mine["impression_id"], "user_id": victim, "ad_id": other_ad},
        "an id made up": {"impression_id": str(uuid.uuid4()), "user_id": victim, "ad_id": mine["ad_id"]},
        "an id shaped like one": {"impression_id": f"{uuid.uuid4()}.{mac}", "user_id": victim,
                                  "ad_id": mine["ad_id"]},
        "a mac changed": {"impression_id": f"{rid}.{mac[::-1]}", "user_id": victim, "ad_id": mine["ad_id"]},
        "another impression's ad": {"impression_id": shown[1]["impression_id"], "user_id": victim,
                                    "ad_id": mine["ad_id"]},
    }
    for what, body in forged.items():
        r = client.post("/clicks", json=body)
        assert r.status_code == 403, (what, r.text)
        assert "impression_id" in r.json()["error"], what
    real = client.post("/clicks", json={"impression_id": seen[0]["impression_id"], "user_id": witness,
                                        "ad_id": seen[0]["ad_id"]})
    assert real.status_code == 202, real.text
    wait_until(lambda: stat(rds, "labelled_clicks") == before.get((keys.STATS, "labelled_clicks"), 0) + 1, 30,
               "the real click to be learned")
    # the real click's moves, and nothing else
    changed = moved(before, counters(rds))
    arm_clicks = [k for k in changed if k[0].startswith("arm:")]
    assert len(arm_clicks) == 1 and arm_clicks[0][1] == "clicks" and changed[arm_clicks[0]] == 1, changed
    assert {k: v for k, v in changed.items() if not k[0].startswith("arm:")} == {
        (keys.adstat("treatment", "clicks"), seen[0]["ad_id"]): 1,
        (keys.adstat("treatment", "labelled"), seen[0]["ad_id"]): 1,
        (keys.STATS, "labelled_clicks"): 1, (keys.STATS, "learned_clicks"): 1}, changed
    for got, want in zip(state(rds, victim, settings.partitions), victim_before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert state(rds, mallory, settings.partitions) is None
    # nothing of them reached Kafka: the only click produced is the real one
    produced = [c for c in read_topic(infra.kafka, records.CLICKS) if c["user_id"] in (victim, mallory, witness)]
    assert [c["event_id"] for c in produced] == [real.json()["event_id"]]


def test_another_api_process_started_later_takes_the_ids_this_one_signed(settings, client: httpx.Client) -> None:
    # the secret is in Redis, created once: a restarted or second API process checks the ids served before
    user = uid("restart")
    a = client.post("/recommend", json={"user_id": user, "k": 1}).json()["ads"][0]
    other = settings.model_copy(update={"api": f"http://127.0.0.1:{free_port()}"})
    p = start_api(other)
    try:
        with httpx.Client(base_url=other.api, timeout=10) as c:
            body = {"impression_id": a["impression_id"], "user_id": user, "ad_id": a["ad_id"]}
            assert c.post("/clicks", json=body).status_code == 202
            assert c.post("/clicks", json={**body, "user_id": uid("mallory")}).status_code == 403
    finally:
        p.stop(20)


# --- bounded input -------------------------------------------------------------------------------


def test_a_one_megabyte_context_gets_413_before_it_is_read(client: httpx.Client) -> None:
    body = {"user_id": "big", "context": {"blob": "x" * MiB}}
    r = client.post("/recommend", json=body)
    assert r.status_code == 413, r.text[:200]
    err = r.json()
    assert err["limit"] == 64 * 1024 and "65536 bytes" in err["error"] and "PRIVADS_MAX_BODY_BYTES" in err["error"]


def test_a_chunked_body_without_length_is_limited_too(settings, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "chunky", "context": {"blob": "'
        for _ in range(64):
            yield b"x" * 16384
        yield b'"}}'

    # a fresh connection: the API closes the one it refuses a body on
    with httpx.Client(base_url=settings.api, timeout=10) as c:
        r = c.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == "body_too_large"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("context", "limit"), [
    ({f"k{i}": i for i in range(33)}, "32"),
    ({"k" * 65: "v"}, "64"),
    ({"page": "x" * 257}, "256 characters"),
    ({f"k{i}": "x" * 250 for i in range(9)}, "2048 bytes"),
    ({"nested": {"a": 1}}, "strings, numbers, booleans or null"),
    ({"list": [1, 2]}, "strings, numbers, booleans or null"),
    ({"huge": 2**70}, "64 bits"),
])
def test_context_over_its_limits_gets_422_naming_the_limit(client: httpx.Client, context: dict, limit: str) -> None:
    r = client.post("/recommend", json={"user_id": "ctx", "k": 1, "context": context})
    assert r.status_code == 422, r.text
    err = r.json()
    assert "context" in err["error"] and limit in err["error"], err["error"]
    assert any(f["field"].startswith("context") for f in err["fields"])


def test_context_within_its_limits_is_served(client: httpx.Client) -> None:
    context = {"device": "mobile", "daypart": 2, "logged_in": True, "lat": 48.85, "campaign": None,
               "page": "x" * 256}
    r = client.post("/recommend", json={"user_id": "ctx-ok", "k": 2, "context": context})
    assert r.status_code == 200 and len(r.json()["ads"]) == 2


@pytest.mark.parametrize(("method", "path", "raw", "field"), [
    ("POST", "/recommend", b'{"user_id": "\\ud800"}', "user_id"),
    ("POST", "/recommend", b'{"user_id": "u", "context": {"page": "\\udfff"}}', "context"),
    ("POST", "/clicks", b'{"impression_id": "i", "user_id": "\\ud800", "ad_id": "a"}', "user_id"),
    ("PUT", "/ads/surrogate", b'{"text": "boots \\ud800", "bid": 1.0}', "text"),
])
def test_text_that_cannot_be_written_as_utf8_gets_422_not_500(client: httpx.Client, method: str, path: str,
                                                              raw: bytes, field: str) -> None:
    # JSON may spell a lone surrogate; Kafka's encoders cannot write it
    r = client.request(method, path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in [f["field"] for f in r.json()["fields"]]


@pytest.mark.parametrize("path", ["/lift", "/lift/series"])
def test_lift_windows_are_capped_at_the_daily_roll_ups_life(client: httpx.Client, path: str) -> None:
    # a year's window reads the roll-ups: bounded whatever the window (tests/infra/test_store.py counts them)
    assert client.get(path, params={"window": keys.ARM_MAX_WINDOW_S}).status_code == 200
    r = client.get(path, params={"window": keys.ARM_MAX_WINDOW_S + 1})
    assert r.status_code == 422 and "window" in r.json()["error"] and str(keys.ARM_MAX_WINDOW_S) in r.json()["error"]


# --- who may listen where ------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("192.168.1.2", False),
    ("example.com", False), ("", False)])
def test_only_loopback_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def privads(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privads", *args], env={**os.environ, **env},
                          capture_output=True, timeout=60)


def test_the_api_refuses_to_listen_beyond_loopback_without_a_key() -> None:
    nothing = {"PRIVADS_API_KEY": "", "PRIVADS_KAFKA": "", "PRIVADS_REDIS": "",
               "PRIVADS_EMBEDDED_KAFKA_PORT": str(free_port()), "PRIVADS_EMBEDDED_REDIS_PORT": str(free_port())}
    for args, env in ((["api", "--host", "0.0.0.0", "--port", str(free_port())], {}),
                      (["up"], {"PRIVADS_API": f"http://0.0.0.0:{free_port()}"})):
        r = privads(*args, env={**nothing, **env})
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, r.stderr.decode()
        assert lines[0].startswith(f"privads {args[0]}: refusing to listen on 0.0.0.0 without PRIVADS_API_KEY")
        assert not r.stdout  # nothing was started
    # with a key it gets past that check (and stops at the next one here: no broker runs)
    r = privads("api", "--host", "0.0.0.0", "--port", str(free_port()), env={**nothing, "PRIVADS_API_KEY": "k" * 32})
    assert r.returncode != 0 and "no embedded broker is running" in r.stderr.decode()
