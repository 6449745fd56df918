"""Clicks produced straight to Kafka that are not their impression's: dead-lettered, never learned.

On a real broker and redis-server with a real stream worker. A click joins its
impression only if its ``user_id`` and ``ad_id`` are the impression's; each test
sends a real click beside the forged ones and waits for it to be learned, so the
"nothing changed" checks see a batch window that did change something.

The attribution window is long here (nothing closes during the module), so that
every counter that moves is accounted for exactly.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import redis

from conftest import wait_until
from helpers import click, counters, impression, moved, produce, read_topic, sample_ads, user_key
from privads.infra import keys, records
from privads.infra.partitioning import owner
from privads.infra.processes import free_port
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "coffee & tea"], per_category=3)
PARTITIONS = 2


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=PARTITIONS,
                    control_share=0.0, catalog=None, seed=7, api=f"http://127.0.0.1:{free_port()}",
                    attribution_window_s=300.0)


@pytest.fixture(scope="module")
def catalog(infra, worker, rds: redis.Redis) -> list[str]:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog agent to store every ad")
    return [a["ad_id"] for a in ADS]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def on_partition(of: str, prefix: str, same: bool) -> str:
    """A new user id whose events the partition of ``of`` owns (or, with ``same`` False, another partition)."""
    home = owner(of.encode(), PARTITIONS)
    while (owner((u := uid(prefix)).encode(), PARTITIONS) == home) != same:
        pass
    return u


def state(r: redis.Redis, user_id: str) -> tuple | None:
    blob = r.get(user_key(r, user_id))
    return keys.unpack_user(blob) if blob else None


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


def letters_of(servers: str, event_ids: set[str]) -> dict[str, dict]:
    """The dead letters whose payload is one of these clicks, by click event id."""
    out = {}
    for d in read_topic(servers, records.DEAD_LETTER):
        if d.get("payload_encoding") == "utf-8":
            body = json.loads(d["payload"])
            if isinstance(body, dict) and body.get("event_id") in event_ids:
                out[body["event_id"]] = d
    return out


def test_forged_clicks_after_their_impression_are_dead_lettered_and_change_nothing(
        infra, catalog, rds: redis.Redis) -> None:
    victim, witness = uid("victim"), uid("witness")
    mallory = on_partition(victim, "mallory", same=True)  # reaches the partition that holds the victim's impression
    faraway = on_partition(victim, "faraway", same=False)
    seen, real = impression(victim, catalog[0]), impression(witness, catalog[1])
    produce(infra.kafka, records.IMPRESSIONS, [(victim, seen), (witness, real)])
    wait_until(lambda: state(rds, victim) and state(rds, witness), 30, "both impressions' fast negatives")
    victim_before, witness_before = state(rds, victim), state(rds, witness)
    before = counters(rds)

    forged = {
        # another user's impression, the ad it showed
        "other-user": {**click(seen), "user_id": mallory},
        # the victim's own impression, another ad
        "wrong-ad": {**click(seen), "ad_id": catalog[2]},
        # both wrong
        "both": {**click(seen), "user_id": mallory, "ad_id": catalog[3]},
        # an impression id nobody served: it waits as an orphan (unattributed, as the contract counts it)
        "made-up": {**click(seen), "impression_id": uuid.uuid4().hex},
        # another user's impression from a user of another partition: it cannot meet it, and waits likewise
        "other-partition": {**click(seen), "user_id": faraway},
    }
    produce(infra.kafka, records.CLICKS, [(c["user_id"], c) for c in forged.values()] + [(witness, click(real))])
    rejected = {forged[k]["event_id"]: k for k in ("other-user", "wrong-ad", "both")}
    letters = wait_until(lambda: len(got := letters_of(infra.kafka, set(rejected))) == len(rejected) and got, 30,
                         "a dead letter for each mismatched click")
    wait_until(lambda: stat(rds, "labelled_clicks") == before.get((keys.STATS, "labelled_clicks"), 0) + 1, 30,
               "the real click to be learned")
    wait_until(lambda: stat(rds, "unattributed_clicks") == before.get((keys.STATS, "unattributed_clicks"), 0) + 2,
               30, "the two clicks without a reachable impression to be counted")

    # exactly what the one real click moves, the two waiting clicks and the rejections: nothing else
    b = int(real["ts"]) // keys.ARM_BUCKET_S
    assert moved(before, counters(rds)) == {
        (keys.arm("treatment", b), "clicks"): 1,
        (keys.adstat("treatment", "clicks"), catalog[1]): 1,
        (keys.adstat("treatment", "labelled"), catalog[1]): 1,
        (keys.STATS, "labelled_clicks"): 1, (keys.STATS, "learned_clicks"): 1,
        (keys.STATS, "unattributed_clicks"): 2,
        (keys.STATS, "mismatched_clicks"): 3, (keys.STATS, "dead_letters"): 3,
    }
    for got, want in zip(state(rds, victim), victim_before, strict=True):
        np.testing.assert_array_equal(got, want)  # no click's half on the victim
    assert state(rds, mallory) is None and state(rds, faraway) is None
    assert not np.array_equal(state(rds, witness)[0], witness_before[0])  # the real click was learned
    for event_id, kind in rejected.items():
        d = letters[event_id]
        assert d["topic"] in (records.CLICKS, records.REPARTITION) and d["offset"] >= 0, d
        assert "does not match impression" in d["error"] and "not learned" in d["error"], d
        wrong = {"other-user": "user_id is", "wrong-ad": "ad_id is", "both": "user_id and ad_id are"}[kind]
        assert wrong in d["error"] and victim not in d["error"], d  # the victim's id is not told
        assert json.loads(d["payload"]) == forged[kind]  # the original message


def test_a_forged_click_before_its_impression_is_dead_lettered_when_the_impression_arrives(
        infra, catalog, rds: redis.Redis) -> None:
    victim, twin = uid("victim"), uid("twin")
    mallory = on_partition(victim, "mallory", same=True)
    seen, same = impression(victim, catalog[4]), impression(twin, catalog[4])
    early = {**click(seen), "user_id": mallory}
    unattributed, labelled = stat(rds, "unattributed_clicks"), stat(rds, "labelled_clicks")
    ad_clicks = int(rds.hget(keys.adstat("treatment", "clicks"), catalog[4]) or 0)
    produce(infra.kafka, records.CLICKS, [(mallory, early)])
    wait_until(lambda: stat(rds, "unattributed_clicks") == unattributed + 1, 30, "the early click to wait")
    # the impression arrives (with a twin's: the same ad to a new user, never clicked)
    produce(infra.kafka, records.IMPRESSIONS, [(victim, seen), (twin, same)])
    letters = wait_until(lambda: letters_of(infra.kafka, {early["event_id"]}), 30, "the forged orphan's dead letter")
    wait_until(lambda: state(rds, victim) and state(rds, twin), 30, "both impressions to be learned")
    d = letters[early["event_id"]]
    assert "user_id is not the impression's" in d["error"] and json.loads(d["payload"]) == early
    assert d["topic"] == records.CLICKS and d["offset"] >= 0  # where it was read, kept while it waited
    assert stat(rds, "unattributed_clicks") == unattributed  # it was never a click: not even unattributed
    assert stat(rds, "labelled_clicks") == labelled
    assert int(rds.hget(keys.adstat("treatment", "clicks"), catalog[4]) or 0) == ad_clicks
    assert not rds.hget(keys.orphans(owner(victim.encode(), PARTITIONS)), seen["event_id"])
    # the victim learned its impression's label-free half only, exactly as the twin did
    for got, want in zip(state(rds, victim), state(rds, twin), strict=True):
        np.testing.assert_array_equal(got, want)
    assert state(rds, mallory) is None
    # its real click, when it comes, still joins
    produce(infra.kafka, records.CLICKS, [(victim, click(seen))])
    wait_until(lambda: stat(rds, "labelled_clicks") == labelled + 1, 30, "the real click to join")
