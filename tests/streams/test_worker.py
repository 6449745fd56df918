"""The stream worker against a real broker and redis-server: catalog, attribution, learning, dead letters.

This module runs with a 4 s attribution window (1 s buckets), so windows close within the tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from conftest import wait_until
from helpers import click, impression, produce, read_topic, sample_ads, user_key
from privads.infra import keys, records
from privads.infra.processes import free_port
from privads.infra.settings import Settings
from privads.infra.store import UserStore
from privads.ranker.encoder import encoder_input, text_hash
from privads.ranker.projector import initial_projector
from privads.ranker.updates import UpdateParams, logit, update_user

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "coffee & tea"], per_category=5)
WINDOW = 4.0


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, control_share=0.0,
                    catalog=None, seed=7, api=f"http://127.0.0.1:{free_port()}", attribution_window_s=WINDOW,
                    dedupe_horizon_s=6.0, population_strength=2.0)


@pytest.fixture(scope="module")
def catalog(infra, worker, rds: redis.Redis) -> list[dict]:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog agent to store every ad")
    return ADS


def state(r: redis.Redis, user_id: str):
    blob = r.get(user_key(r, user_id))
    return keys.unpack_user(blob) if blob else None


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


def arm_impressions(r: redis.Redis, policy: str) -> int:
    return sum(int(r.hget(k, "impressions") or 0) for k in r.scan_iter(keys.arm(policy, 0).removesuffix("0") + "*"))


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_catalog_agent_stores_ads_with_text_embeddings(settings: Settings, catalog, rds: redis.Redis) -> None:
    for ad in catalog:
        h = rds.hgetall(keys.ad(ad["ad_id"]))
        assert h[b"text"].decode() == ad["text"]
        assert float(h[b"bid"]) == pytest.approx(ad["bid"])
        # the embedding is of what the encoder reads: the ad's category, then its text
        assert h[b"text_hash"].decode() == text_hash(encoder_input(ad["text"], ad.get("category")),
                                                     settings.encoder_backend)
        emb = np.frombuffer(rds.get(keys.embedding(h[b"text_hash"].decode())), dtype="<f4")
        assert emb.shape == (384,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)
    assert rds.xlen(keys.CATALOG_LOG) >= len(catalog)


def test_a_click_is_one_positive_and_its_duplicates_change_nothing(infra, catalog, rds: redis.Redis) -> None:
    user = uid("click")
    imp = impression(user, catalog[0]["ad_id"])
    c = click(imp)
    c2 = {**click(imp), "ts": c["ts"]}  # a second click event on the same impression
    before = stat(rds, "labelled_clicks")
    produce(infra.kafka, records.IMPRESSIONS, [(user, imp)])
    produce(infra.kafka, records.CLICKS, [(user, c), (user, c), (user, c2)])
    wait_until(lambda: state(rds, user), 30, "the user's state")
    time.sleep(WINDOW + 2.5)  # the window closes: a clicked impression must not also become a negative
    mean, precision, count = state(rds, user)
    assert count == 1
    assert stat(rds, "labelled_clicks") == before + 1, rds.hgetall(keys.STATS)
    # the ad's Beta posterior counts, in the impression's arm only
    assert int(rds.hget(keys.adstat("treatment", "clicks"), catalog[0]["ad_id"])) >= 1
    assert rds.hget(keys.adstat("control", "clicks"), catalog[0]["ad_id"]) is None
    assert np.linalg.norm(mean) > 0.1  # moved from the zero prior toward the clicked ad
    assert (precision >= 16.0).all() and precision.sum() > 16.0 * mean.size


def projected(settings: Settings, r: redis.Redis, ad_id: str) -> np.ndarray:
    """The ad's vector in user space as this module's workers see it (no learner: the seeded initial projector)."""
    emb = np.frombuffer(r.get(keys.embedding(r.hget(keys.ad(ad_id), "text_hash").decode())), dtype="<f4")
    return initial_projector(settings.d_ad, settings.d_user, settings.seed).project(emb[None])[0]


def prior_at_rest(settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """The prior a new user starts from: no learner publishes here, so no version carries a population prior."""
    return np.zeros(settings.d_user, np.float32), np.full(settings.d_user, settings.prior_precision, np.float32)


def test_an_unclicked_impression_is_a_negative_at_once_and_its_window_adds_nothing(
        settings, infra, catalog, rds: redis.Redis) -> None:
    user = uid("neg")
    ad = catalog[1]["ad_id"]
    imp = {**impression(user, ad), "factor": 0.5}  # served with its calibration factor at 0.5
    negatives = stat(rds, "labelled_negatives")
    prior = prior_at_rest(settings)
    offset = np.log(0.5)
    start = time.time()
    produce(infra.kafka, records.IMPRESSIONS, [(user, imp)])
    mean, precision, count = wait_until(lambda: state(rds, user), WINDOW + 10, "the fast negative")
    assert time.time() - start < WINDOW - 1  # learned before its window could close
    assert count == 1
    # exactly the label-free half of the logistic step from the population prior, z offset by the logged factor
    p = projected(settings, rds, ad)
    params = dataclasses.replace(UpdateParams.from_settings(settings), bias=logit(settings.base_rate) + offset)
    want_m, want_q = update_user(*prior, p[None], np.zeros(1), prior[0], params)
    np.testing.assert_allclose(mean, want_m, atol=1e-6)
    np.testing.assert_allclose(precision, want_q, rtol=1e-6)
    assert float(mean @ p) < float(prior[0] @ p)  # moved away from the ad it ignored
    # the window closes: the label is counted (and archived) but the user has learned it already
    time.sleep(max(0.0, start + WINDOW + 2.5 - time.time()))
    wait_until(lambda: stat(rds, "labelled_negatives") > negatives, 10, "the window to close")
    np.testing.assert_array_equal(state(rds, user)[0], mean)


def test_a_late_click_after_a_fast_negative_completes_the_positive_step(
        settings, infra, catalog, rds: redis.Redis) -> None:
    """The promise of ``ranker.updates.learn_events``: negative now, click later = the labelled positive's step."""
    user = uid("turn")
    ad = catalog[5]["ad_id"]
    imp = {**impression(user, ad), "factor": 2.0}
    prior = prior_at_rest(settings)
    offset = np.log(2.0)
    produce(infra.kafka, records.IMPRESSIONS, [(user, imp)])
    m_neg, q_neg, _ = wait_until(lambda: state(rds, user), WINDOW + 10, "the fast negative")
    p = projected(settings, rds, ad)
    assert float(m_neg @ p) < float(prior[0] @ p)
    clicks = stat(rds, "labelled_clicks")
    produce(infra.kafka, records.CLICKS, [(user, click(imp))])  # within the window: the negative turns
    wait_until(lambda: stat(rds, "labelled_clicks") == clicks + 1, 30, "the click to join its impression")
    mean, precision, count = wait_until(lambda: (s := state(rds, user)) is not None and not np.array_equal(s[0], m_neg)
                                        and s, 30, "the click's half")
    params = dataclasses.replace(UpdateParams.from_settings(settings), bias=logit(settings.base_rate) + offset)
    want_m, want_q = update_user(*prior, p[None], np.ones(1), prior[0], params)
    np.testing.assert_allclose(mean, want_m, atol=1e-5)  # as if the impression had been labelled clicked
    np.testing.assert_array_equal(precision, q_neg)  # the information term came with the impression
    np.testing.assert_allclose(precision, want_q, rtol=1e-6)
    assert count == 1 and float(mean @ p) > float(prior[0] @ p)
    time.sleep(WINDOW + 2.5)  # its window closes: no negative on top
    np.testing.assert_array_equal(state(rds, user)[0], mean)


def test_a_users_tastes_count_their_clicks_and_the_clicks_expected_of_each_category(
        infra, catalog, rds: redis.Redis) -> None:
    """The user state's tastes (``scoring.user_factors``' counts): per category, exact, from the events alone.

    Only the learned arms' events count: the popularity control logs no expected clicks.
    """
    user = uid("tastes")
    ins, cof = catalog[0], catalog[5]  # "insurance" and "coffee & tea" (``ADS``)
    served = [  # (ad, pctr, factor served, the user's own factor in it)
        (ins, 0.2, 0.5, 0.25), (ins, 0.1, 2.0, 1.0), (cof, 0.4, 1.5, 3.0)]
    imps = [{**impression(user, a["ad_id"], position=j), "pctr": p, "factor": f, "user_factor": u}
            for j, (a, p, f, u) in enumerate(served)]
    control = impression(user, catalog[1]["ad_id"], policy="control")  # "insurance", by the popularity control
    produce(infra.kafka, records.IMPRESSIONS, [(user, i) for i in [*imps, control]])
    learned = stat(rds, "learned_clicks")
    produce(infra.kafka, records.CLICKS, [(user, click(imps[2])), (user, click(control))])
    # both clicks learned, into the posterior, in the same transactions as the tastes
    wait_until(lambda: stat(rds, "learned_clicks") == learned + 2 and (s := state(rds, user)) and s[2] == 4, 30,
               "the impressions and both clicks to reach the user")
    t = keys.unpack_tastes(rds.get(user_key(rds, user)))
    got = {int(h): (float(c), float(e), float(n)) for h, c, e, n in t.tolist()}
    # expected clicks without the user's own factor: pctr · factor / user_factor
    want = {keys.category_hash("insurance"): (0.0, 0.2 * 0.5 / 0.25 + 0.1 * 2.0 / 1.0, 2.0),
            keys.category_hash("coffee & tea"): (1.0, 0.4 * 1.5 / 3.0, 1.0)}
    assert got.keys() == want.keys()
    for h, (c, e, n) in want.items():
        assert got[h][0] == c and got[h][2] == n
        assert got[h][1] == pytest.approx(e, rel=1e-6)
    mean, _, count = state(rds, user)  # the posterior reads as before beside them, the control's impression in it
    assert count == 4 and mean.shape == (64,)


def test_a_click_after_the_window_is_late_not_learned(infra, catalog, rds: redis.Redis) -> None:
    user = uid("late")
    imp = impression(user, catalog[2]["ad_id"])
    produce(infra.kafka, records.IMPRESSIONS, [(user, imp)])
    mean = wait_until(lambda: state(rds, user), WINDOW + 10, "the fast negative")[0]
    time.sleep(WINDOW + 2.5)  # its window closes
    late = stat(rds, "late_clicks")
    c = click(imp)
    produce(infra.kafka, records.CLICKS, [(user, c)])
    wait_until(lambda: stat(rds, "late_clicks") == late + 1, 30, "the late click to be counted")
    assert state(rds, user)[2] == 1
    np.testing.assert_array_equal(state(rds, user)[0], mean)  # a negative for good


def test_a_click_before_its_impression_is_joined(infra, catalog, rds: redis.Redis) -> None:
    user = uid("early")
    imp = impression(user, catalog[3]["ad_id"])
    c = click(imp)
    before = stat(rds, "unattributed_clicks")
    produce(infra.kafka, records.CLICKS, [(user, c)])
    wait_until(lambda: stat(rds, "unattributed_clicks") == before + 1, 30, "the early click counted unattributed")
    produce(infra.kafka, records.IMPRESSIONS, [(user, imp)])
    wait_until(lambda: state(rds, user), 30, "the late-joined positive to be learned")
    assert stat(rds, "unattributed_clicks") == before
    time.sleep(WINDOW + 2.5)
    assert state(rds, user)[2] == 1  # one positive, no negative after the window


def test_a_click_whose_impression_never_comes_stays_counted(infra, catalog, rds: redis.Redis) -> None:
    user = uid("orphan")
    c = click(impression(user, catalog[0]["ad_id"]))
    before, expired = stat(rds, "unattributed_clicks"), stat(rds, "expired_orphans")
    produce(infra.kafka, records.CLICKS, [(user, c)])
    wait_until(lambda: stat(rds, "expired_orphans") == expired + 1, 3 * WINDOW + 10, "the orphan to expire")
    assert stat(rds, "unattributed_clicks") == before + 1
    assert state(rds, user) is None


def test_a_duplicate_impression_is_counted_once(infra, catalog, rds: redis.Redis) -> None:
    policy = uid("arm")
    imp = impression(uid("dup"), catalog[4]["ad_id"], policy=policy)
    dups = stat(rds, "duplicate_impressions")
    produce(infra.kafka, records.IMPRESSIONS, [(imp["user_id"], imp)] * 3)
    wait_until(lambda: stat(rds, "duplicate_impressions") == dups + 2, 30, "duplicates to be recognised")
    assert arm_impressions(rds, policy) == 1


def test_clicks_from_librdkafka_join_exactly(infra, catalog, rds: redis.Redis) -> None:
    from confluent_kafka import Producer

    users = [uid("rdk") for _ in range(40)]
    imps = [impression(u, catalog[i % len(catalog)]["ad_id"]) for i, u in enumerate(users)]
    produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps])  # kafka-python: murmur2
    before, fwd = stat(rds, "labelled_clicks"), stat(rds, "forwarded")
    p = Producer({"bootstrap.servers": infra.kafka})  # librdkafka's default partitioner: CRC32
    for i in imps:
        p.produce(records.CLICKS, key=i["user_id"].encode(), value=json.dumps(click(i)).encode())
    assert p.flush(30) == 0
    wait_until(lambda: stat(rds, "labelled_clicks") == before + len(imps), 30, "every click to join its impression")
    assert stat(rds, "forwarded") > fwd  # some landed on a partition that does not own their user
    assert all(state(rds, u)[2] == 1 for u in users)


def test_bad_messages_go_to_dead_letter_and_good_traffic_flows(infra, catalog, rds: redis.Redis) -> None:
    user = uid("good")
    good = impression(user, catalog[2]["ad_id"])
    bad = {
        "not-json": b"{this is not json",
        "array": b"[1, 2]",
        "missing-user": json.dumps({k: v for k, v in impression("x", "a").items() if k != "user_id"}).encode(),
        "bad-propensity": json.dumps(impression("x", "a", propensity=1.5)).encode(),
        "binary": b"\xff\xfe\x00garbage",
    }
    produce(infra.kafka, records.IMPRESSIONS, [("k", v) for v in bad.values()] + [(user, good)])
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
    # the good impression in the same batch was not lost: its window closes into a negative
    assert wait_until(lambda: state(rds, user), WINDOW + 10, "the good impression to be learned")[2] == 1
    assert not rds.exists(keys.ad("ad-x"))


def test_archive_holds_every_impression_and_label_once(infra, catalog, rds: redis.Redis) -> None:
    from privads.streams import archive

    root = infra.data / "archive"

    def settled() -> bool:
        imps = archive.read_table(root, "impressions")
        labs = archive.read_table(root, "labels")
        counted = sum(int(rds.hget(k, "impressions") or 0) for k in rds.scan_iter("arm:*"))
        return imps.num_rows == counted and labs.num_rows == stat(rds, "labelled_clicks") and counted > 0

    wait_until(settled, 3 * WINDOW + 20, "the archive to catch up with the counters")
    imps = archive.read_table(root, "impressions").column("event_id").to_pylist()
    labs = archive.read_table(root, "labels").column("impression_id").to_pylist()
    assert len(imps) == len(set(imps)) and len(labs) == len(set(labs))
    assert set(labs) <= set(imps)


def test_the_ad_count_log_adds_up_to_the_counts(infra, catalog, rds: redis.Redis) -> None:
    """The API follows the per-ad counts through the log: every committed increment must be in it, once."""
    from privads.ranker.adcounts import AdCounts

    counts = AdCounts()
    for _, fields in rds.xrange(keys.ADSTAT_LOG):
        counts.apply(json.loads(fields[b"d"]))
    for policy in ("treatment", "control"):
        want: dict[str, list[int]] = {}
        for i, what in enumerate(keys.AD_COUNT_FIELDS):
            for ad_id, n in rds.hgetall(keys.adstat(policy, what)).items():
                want.setdefault(ad_id.decode(), [0] * len(keys.AD_COUNT_FIELDS))[i] = int(n)
        assert counts.of_arm(policy) == {a: tuple(v) for a, v in want.items()}
    assert counts.of_arm("treatment"), "the module's traffic labelled no ad"


def test_the_population_sums_hold_every_learned_user_once_and_erasure_takes_one_out(
        settings, infra, catalog, rds: redis.Redis) -> None:
    users = [uid("pop") for _ in range(6)]
    imps = [impression(u, catalog[i % len(catalog)]["ad_id"]) for i, u in enumerate(users)]
    clicks = stat(rds, "labelled_clicks")
    produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps])
    produce(infra.kafka, records.CLICKS, [(i["user_id"], click(i)) for i in imps[:3]])
    wait_until(lambda: all(state(rds, u) for u in users), 30, "every user to be learned")
    wait_until(lambda: stat(rds, "labelled_clicks") >= clicks + 3, 30, "the clicks")

    def sums() -> tuple[np.ndarray, int]:
        total, n = np.zeros(settings.d_user), 0
        for p in range(settings.partitions):
            blob = rds.get(keys.population(p))
            if blob:
                t, k = keys.unpack_population(blob)
                total, n = total + t, n + k
        return total, n

    def every_user() -> tuple[np.ndarray, int]:
        means = [keys.unpack_user(rds.get(k))[0] for k in rds.scan_iter(match=keys.USER_PREFIX + "*")]
        return np.sum(means, axis=0, dtype=np.float64), len(means)

    time.sleep(1.5)  # nothing in flight: the sums and the states are read at rest
    total, n = sums()
    want, count = every_user()
    assert n == count
    np.testing.assert_allclose(total, want, atol=1e-4)
    gone = keys.unpack_user(rds.get(keys.user(users[0], settings.partitions)))[0]

    async def erase() -> None:
        r = aioredis.Redis.from_url(infra.redis_url)
        try:
            await UserStore(r, settings.partitions).erase(users[0], time.time())
        finally:
            await r.aclose()

    asyncio.run(erase())
    total_after, n_after = sums()
    assert n_after == n - 1 and not rds.exists(keys.user(users[0], settings.partitions))
    np.testing.assert_allclose(total_after, total - gone, atol=1e-6)
