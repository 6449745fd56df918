"""The dashboard in a real headless Chromium: its charts draw the API's numbers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from conftest import start_api, start_worker, stopping, wait_until
from helpers import produce, sample_ads
from privads.infra import records
from privads.infra.processes import free_port
from privads.infra.settings import Settings
from privads.ranker import experiment

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "gaming"], per_category=6, bid=1.0)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what the fixture sent, per arm: impressions, and the values of its clicks (each click carries one)
SENT: dict[str, dict[str, list[float] | int]] = {}


@pytest.fixture(scope="module")
def settings(infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=9,
                    api=f"http://127.0.0.1:{free_port()}", control_share=0.5, control_policy="random")


@pytest.fixture(scope="module")
def client(infra, settings: Settings, rds: redis.Redis):
    rng = np.random.default_rng(1)
    sent = 0
    with stopping() as procs, httpx.Client(base_url=settings.api, timeout=10) as c:
        procs.append(start_worker(settings, rds))
        procs.append(start_api(settings))
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: c.get("/healthz").json()["ads"] == len(ADS), 60, "the catalog")
        SENT.update({arm: {"impressions": 0, "values": []} for arm in experiment.ARMS})
        for u in range(80):
            user = f"dash-{u}"
            arm = experiment.assign_arm(user, settings.arm_salt, 0.5)
            for _ in range(2):
                for a in c.post("/recommend", json={"user_id": user, "k": 3}).json()["ads"]:
                    SENT[arm]["impressions"] += 1  # type: ignore[operator]
                    if rng.random() < (0.3 if arm == "treatment" else 0.15):
                        value = float(rng.choice([0.25, 1.0, 4.5]))
                        c.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user,
                                                "ad_id": a["ad_id"], "value": value})
                        SENT[arm]["values"].append(value)  # type: ignore[union-attr]
                        sent += 1

        def both_arms() -> dict | None:
            body = c.get("/lift").json()
            arms = body["arms"]
            ok = body["lift"] is not None and sum(a["clicks"] for a in arms.values()) == sent
            return body if ok else None

        wait_until(both_arms, 60, "every click counted, in both arms")
        yield c


def render(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (no background traffic: there is no network)."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed for this test (make test installs it)"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=6000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def attr(dom: str, tag: str, ident: str, name: str) -> str:
    m = re.search(rf'<{tag}[^>]*{ident}[^>]*>', dom)
    assert m, f"no <{tag} {ident}> in the page"
    v = re.search(rf'{name}="([^"]*)"', m.group(0))
    assert v, f"<{tag} {ident}> has no {name}"
    return v.group(1)


def test_the_dashboard_draws_ctr_per_arm_and_the_lift_with_its_band(client: httpx.Client, settings: Settings,
                                                                   tmp_path: Path) -> None:
    lift = client.get("/lift").json()
    series = client.get("/lift/series").json()
    assert set(series["arms"]) == set(experiment.ARMS) and len(series["starts"]) == len(series["lift"])
    assert series["lift"][-1] == pytest.approx(lift["lift"])  # the cumulative lift ends where /lift is
    dom = render(f"{settings.api}/dashboard", tmp_path / "profile")
    assert int(attr(dom, "body", "data-refreshed", "data-refreshed")) >= 1
    # the CTR chart has a line per arm with points, the lift chart its line and band
    assert int(attr(dom, "svg", 'id="ctr-chart"', "data-points")) >= 2
    for arm in experiment.ARMS:
        assert int(attr(dom, "polyline", f'data-arm="{arm}"', "data-n")) >= 1
        points = attr(dom, "polyline", f'data-arm="{arm}"', "points")
        assert re.fullmatch(r"[\d.]+,[\d.]+( [\d.]+,[\d.]+)*", points)
    assert int(attr(dom, "svg", 'id="lift-chart"', "data-points")) >= 1
    for arm in experiment.ARMS:  # each arm's CTR with its interval band
        assert int(attr(dom, "polygon", f'data-arm="{arm}"', "data-n")) >= 1
    assert int(attr(dom, "polygon", 'class="band"', "data-n")) >= 1
    # the numbers it shows are the API's
    assert float(attr(dom, "div", 'id="summary"', "data-lift")) == pytest.approx(lift["lift"], rel=1e-6)
    for arm, a in lift["arms"].items():
        row = re.search(rf'<tr data-arm="{arm}">(.*?)</tr>', dom)
        assert row and f"<td>{a['impressions']}</td>" in row.group(1) and f"<td>{a['clicks']}</td>" in row.group(1)
        assert f"<td>{a['value_per_impression']:.4f}</td>" in row.group(1)  # and the value per impression
    assert float(attr(dom, "div", 'id="value-summary"', "data-lift")) == pytest.approx(lift["value_lift"], rel=1e-6)
    status = re.search(r'<span id="status">([^<]*)</span>', dom)
    assert status and status.group(1) == "" and "always-valid 95% [" in dom


def test_lift_reports_the_always_valid_interval_beside_the_one_look_one(client: httpx.Client) -> None:
    body = client.get("/lift", params={"window": 3600}).json()
    lo, hi = body["lift_ci95"]
    slo, shi = body["lift_ci95_sequential"]
    assert slo < lo <= body["lift"] <= hi < shi and 0 <= body["p_value"] <= body["p_value_sequential"] <= 1


def test_lift_reports_value_per_impression_and_the_value_lift_as_computed_by_hand(client: httpx.Client) -> None:
    body = client.get("/lift", params={"window": 3600}).json()
    moments = {}
    for arm, sent in SENT.items():
        n, values = int(sent["impressions"]), list(sent["values"])  # type: ignore[arg-type]
        got = body["arms"][arm]
        assert got["impressions"] == n and got["clicks"] == len(values)
        assert got["value"] == pytest.approx(sum(values))
        # by hand: an impression without a click is worth 0
        mean = sum(values) / n
        var = sum(v * v for v in values) / n - mean * mean
        half = 1.959963984540054 * (var / n) ** 0.5
        assert got["value_per_impression"] == pytest.approx(mean)
        assert got["value_ci95"] == pytest.approx([max(0.0, mean - half), mean + half])
        moments[arm] = (mean, var, n)
    (mt, vt, nt), (mc, vc, nc) = moments["treatment"], moments["control"]
    theta, se = np.log(mt / mc), np.sqrt(vt / (nt * mt * mt) + vc / (nc * mc * mc))
    assert body["value_lift"] == pytest.approx(mt / mc - 1)
    assert body["value_lift_ci95"] == pytest.approx([np.exp(theta - 1.959963984540054 * se) - 1,
                                                     np.exp(theta + 1.959963984540054 * se) - 1])
    welch = abs(mt - mc) / np.sqrt(vt / nt + vc / nc)
    assert body["value_p_value"] == pytest.approx(float(2 * 0.5 * math.erfc(welch / math.sqrt(2))))
    lo, hi = body["value_lift_ci95_sequential"]  # always valid: wider than the one-look interval, around it
    assert lo < body["value_lift_ci95"][0] and hi > body["value_lift_ci95"][1]
    series = client.get("/lift/series", params={"window": 3600}).json()
    assert series["value_lift"][-1] == pytest.approx(body["value_lift"])  # the cumulative value lift ends there
    for arm in experiment.ARMS:
        assert sum(series["arms"][arm]["value"]) == pytest.approx(body["arms"][arm]["value"])


def _td(dom: str, key: str) -> re.Match:
    m = re.search(rf'<td data-key="{re.escape(key)}"( data-total="(\d+)")?>([^<]*)</td>', dom)
    assert m, f"no panel cell {key!r}"
    return m


def _live_traffic(api: str, stop: threading.Event) -> None:
    """Requests and clicks while the page renders: the panels read a stream that moves."""
    rng = np.random.default_rng(5)
    with httpx.Client(base_url=api, timeout=10) as c:
        i = 0
        while not stop.is_set():
            user = f"live-{i % 40}"
            for a in c.post("/recommend", json={"user_id": user, "k": 3}).json()["ads"]:
                if rng.random() < 0.2:
                    c.post("/clicks", json={"impression_id": a["impression_id"], "user_id": user,
                                            "ad_id": a["ad_id"], "value": 1.0})
            i += 1
            time.sleep(0.02)


def test_every_panel_draws_the_apis_numbers_and_a_trained_version_is_marked(
        client: httpx.Client, settings: Settings, tmp_path: Path) -> None:
    trained = subprocess.run([sys.executable, "-m", "privads", "train", "-q"], capture_output=True, text=True,
                             timeout=300, env={**os.environ, **settings.child_env()})
    assert trained.returncode == 0, trained.stderr[-2000:]
    version = json.loads(trained.stdout)["version"]
    wait_until(lambda: client.get("/model").json()["version"] == version, 30, "the API to swap to the new version")
    history = client.get("/model/history").json()
    assert history[-1]["version"] == version and history[-1]["swapped_at"] is not None
    stop = threading.Event()
    traffic = threading.Thread(target=_live_traffic, args=(settings.api, stop), daemon=True)
    traffic.start()
    try:
        time.sleep(1.0)
        before = {p: client.get(p).json() for p in ("/stream", "/serving", "/model")}
        dom = render(f"{settings.api}/dashboard", tmp_path / "profile")
        after = {p: client.get(p).json() for p in ("/stream", "/serving", "/model")}
    finally:
        stop.set()
        traffic.join(30)
    assert not traffic.is_alive()

    def between(value: float, path: str, *key: str) -> bool:
        lo, hi = before[path], after[path]
        for k in key:
            lo, hi = lo[k], hi[k]
        return lo <= value <= hi

    # the model timeline: the trained version in the table and marked on the CTR chart's time axis
    assert f'<tr data-version="{version}">' in dom
    assert re.search(rf'<line [^>]*data-version="{version}"', dom)
    assert int(attr(dom, "svg", 'id="ctr-chart"', "data-marks")) >= 1
    assert int(attr(dom, "table", 'id="versions"', "data-n")) == len(history)
    assert len(re.findall(r'class="label tick"', dom)) >= 4  # both charts have a time axis
    # stream health, read while events flow: the totals GET /stream gave between the page's reads, events/s moving
    for topic in ("privads.impressions", "privads.clicks"):
        cell = _td(dom, f"rate:{topic}")
        assert between(int(cell.group(2)), "/stream", "processed", topic), topic
    # a rate once read twice (its value is the change over the page's own clock: Chromium's virtual time runs its
    # 2 s refreshes in a few real milliseconds, so whether the workers moved in between is luck, not the page's)
    assert float(_td(dom, "rate:privads.impressions").group(3)) >= 0
    assert _td(dom, "dead_letters").group(3) == str(after["/stream"]["dead_letters"]) == "0"
    assert _td(dom, "dead_letters_per_min").group(3) == "0.0"
    # serving: this process's /recommend count and latency, and a request rate
    assert between(int(_td(dom, "recommend_requests").group(3)), "/serving", "recommend_requests")
    assert float(_td(dom, "qps").group(3)) > 0
    # online quality: the workers' rolling figures
    assert between(int(_td(dom, "examples").group(3)), "/model", "quality", "examples")
    assert re.fullmatch(r"n/a|0\.\d{4}|1\.0000", _td(dom, "auc").group(3))
    assert _td(dom, "version").group(3) == version

    # the quantiles (freshness, latency) are not monotone while traffic flows: checked once it has stopped, exactly
    def quiet() -> tuple[dict, dict] | None:
        first = (client.get("/stream").json(), client.get("/serving").json())
        time.sleep(1.5)
        again = (client.get("/stream").json(), client.get("/serving").json())
        same = first[0] == again[0] and first[1]["recommend_p99_ms"] == again[1]["recommend_p99_ms"]
        return again if same else None

    stream, serving = wait_until(quiet, 30, "the stream to settle")
    dom = render(f"{settings.api}/dashboard", tmp_path / "profile-settled")
    for q in ("freshness_p50_ms", "freshness_p99_ms"):
        assert _td(dom, q).group(3) == f"{stream[q]:g} ms", q
    assert _td(dom, "recommend_p99_ms").group(3) == f"{serving['recommend_p99_ms']:g} ms"


def test_the_why_box_breaks_each_score_into_parts_that_combine_to_it(client: httpx.Client, settings: Settings,
                                                                     tmp_path: Path) -> None:
    user = next(f"dash-{u}" for u in range(80) if experiment.assign_arm(f"dash-{u}", settings.arm_salt, 0.5)
                == "treatment")
    def settled() -> tuple[int] | None:  # the previous test's last impressions still reaching the counters
        first = client.get("/lift").json()["arms"]["treatment"]["impressions"]
        time.sleep(1.5)
        return (first,) if client.get("/lift").json()["arms"]["treatment"]["impressions"] == first else None

    (before,) = wait_until(settled, 30, "the treatment's impressions to settle")
    body = client.get(f"/users/{user}/explain", params={"k": 3}).json()
    assert body["arm"] == "treatment" and body["policy"] == "thompson" and not body["logged"]
    assert body["user_count"] > 0 and len(body["ads"]) == 3
    for a in body["ads"]:  # the parts make the score the ad was ranked by
        combined = min(1 / (1 + math.exp(-(a["dot_scale"] * a["user_dot"] + a["logit"]))) * a["factor"], 1) * a["bid"]
        assert combined == pytest.approx(a["score"], rel=1e-4), a
        assert 0 < a["propensity"] <= 1 and a["retrieval_score"] is not None
    scores = [a["score"] for a in body["ads"]]
    assert scores == sorted(scores, reverse=True)  # served best first
    # the control arm: its policy's score, without the learned parts
    control = next(f"dash-{u}" for u in range(80) if experiment.assign_arm(f"dash-{u}", settings.arm_salt, 0.5)
                   == "control")
    assert client.get(f"/users/{control}/explain").json()["policy"] == "random"
    # the box: the same breakdown in the page, its parts combined to the score shown
    dom = render(f"{settings.api}/dashboard?user={user}", tmp_path / "profile")
    assert attr(dom, "table", 'id="why"', "data-user") == user
    rows = re.findall(r'<tr data-ad="([^"]+)" data-score="([^"]+)" data-combined="([^"]*)">', dom)
    assert len(rows) == 10 and all(float(c) == pytest.approx(float(s), rel=1e-4) for _, s, c in rows)
    assert "score = min(σ(dot_scale · user_dot + logit) · factor, 1) · bid" in dom
    # nothing was logged: no impression counted since
    time.sleep(1.5)
    assert client.get("/lift").json()["arms"]["treatment"]["impressions"] == before
