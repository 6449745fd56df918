"""The learner trains on the user as the ranker saw it at serving, never on a state that holds the label.

Real broker, redis-server, worker and API: a user is served, clicks, is learned by the
stream, is served again; the archived impressions carry the vector each request was
ranked with, and ``load_examples`` returns exactly those, so the click's own update is
not in the features it is learned from.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import redis

from conftest import wait_until
from helpers import learner_examples, produce, read_topic, sample_ads
from privads.infra import keys, records
from privads.infra.processes import free_port
from privads.infra.settings import Settings
from privads.learner.cycle import Examples
from privads.ranker import experiment
from privads.streams import archive

pytestmark = pytest.mark.integration
ADS = sample_ads(["gardening", "jewellery", "gaming"], per_category=5)


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    # a short window, so that the first requests' labels settle within the test; quick archive drains
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, control_share=0.5,
                    catalog=None, seed=7, api=f"http://127.0.0.1:{free_port()}", attribution_window_s=2.0,
                    archive_every_s=0.5)


def user_in(arm: str, settings: Settings, prefix: str) -> str:
    return next(u for i in range(1000) if experiment.assign_arm(u := f"{prefix}{i}", settings.arm_salt,
                                                                 settings.control_share) == arm)


def examples(settings: Settings) -> Examples | None:
    return learner_examples(settings)


def test_a_clicks_own_update_is_not_in_the_features_it_is_learned_from(
        infra, settings: Settings, api: httpx.Client, rds: redis.Redis) -> None:
    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: api.get("/healthz").json()["ads"] == len(ADS), 60, "the API to index the catalog")
    user = user_in(experiment.TREATMENT, settings, "leak-t")
    first = api.post("/recommend", json={"user_id": user, "k": 3}).json()
    assert first["policy"] == experiment.TREATMENT and len(first["ads"]) == 3
    clicked = first["ads"][0]
    r = api.post("/clicks", json={"impression_id": clicked["impression_id"], "user_id": user,
                                  "ad_id": clicked["ad_id"]})
    assert r.status_code == 202, r.text
    # the stream learns the three impressions and the click: the state now holds the click's own update
    wait_until(lambda: int(rds.hget(keys.STATS, "labelled_clicks") or 0) >= 1, 30, "the click to be learned")
    after_click = keys.unpack_user(rds.get(keys.user(user, settings.partitions)))
    assert after_click[2] > 0 and np.linalg.norm(after_click[0]) > 0
    second = api.post("/recommend", json={"user_id": user, "k": 3}).json()
    control_user = user_in(experiment.CONTROL, settings, "leak-c")
    control = api.post("/recommend", json={"user_id": control_user, "k": 3}).json()
    assert control["policy"] == experiment.CONTROL
    time.sleep(settings.attribution_window_s + 0.5)
    # a later request moves the archive's newest time past the first ones' windows
    api.post("/recommend", json={"user_id": user_in(experiment.TREATMENT, settings, "leak-late"), "k": 1})
    ours = {a["impression_id"] for a in first["ads"] + second["ads"] + control["ads"]}

    def archived() -> bool:
        ids = archive.read_table(settings.local / "archive", "impressions").column("event_id").to_pylist()
        return ours <= set(ids)

    wait_until(archived, 30, "the impressions to be archived")
    ex = wait_until(lambda: (e := examples(settings)) is not None and ours <= set(e.event_ids) and e, 30,
                    "the impressions to become examples")
    row = {e: i for i, e in enumerate(ex.event_ids)}

    # the clicked impression is a positive, with the features it was served with: the (empty) prior, count 0,
    # not the state that learned from it
    i = row[clicked["impression_id"]]
    assert ex.clicked[i] == 1.0 and ex.counts[i] == 0
    np.testing.assert_array_equal(ex.users[i], np.zeros(settings.d_user, np.float32))
    assert not np.allclose(ex.users[i], after_click[0], atol=1e-3)
    # the second request was ranked with the state after the first click (float16 in the log), not today's
    today = keys.unpack_user(rds.get(keys.user(user, settings.partitions)))
    assert today[2] > after_click[2]  # the second request's impressions were learned since
    for a in second["ads"]:
        j = row[a["impression_id"]]
        assert ex.clicked[j] == 0.0 and ex.counts[j] == after_click[2]
        np.testing.assert_allclose(ex.users[j], after_click[0], rtol=2e-3, atol=1e-4)
        assert not np.allclose(ex.users[j], today[0], rtol=2e-3, atol=1e-4)
    # the control arm's impressions carry the user as served too: they are training rows like the others
    for a in control["ads"]:
        assert ex.counts[row[a["impression_id"]]] == 0
    logged = [m for m in read_topic(infra.kafka, records.IMPRESSIONS) if m["user_id"] in (user, control_user)]
    assert len(logged) == 9 and all(isinstance(m["user_mean"], str) and m["user_count"] >= 0 for m in logged)
