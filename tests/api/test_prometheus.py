"""The alert rules (ops/prometheus/alerts.yml) for real: promtool checks and unit-tests them, and Debian's
Prometheus, scraping a running stack's /metrics, evaluates every rule without error and fires the dead-letter
alert once a burst of bad events is provoked.

``make test`` installs Debian's ``prometheus`` (which brings ``promtool``) when it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from conftest import REPO, Infra, serving, wait_until
from helpers import produce, sample_ads
from privads.infra import records
from privads.infra.processes import Process, free_port, port_open, wait_port_free
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
RULES = REPO / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "ops" / "prometheus" / "alerts_test.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ADS = sample_ads(["insurance", "gaming"], per_category=3, bid=1.0)
BURST = 150  # bad events: the rule fires above 100 in 5 minutes


def _tool(path: str) -> str:
    assert Path(path).exists(), f"{path} is needed for this test (make test installs Debian's prometheus)"
    return path


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    checked = subprocess.run([_tool(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout
    # the configuration docker-compose.yml runs Prometheus with, its rules included
    config = subprocess.run([_tool(PROMTOOL), "check", "config", str(RULES.parent / "prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0 and "SUCCESS: 9 rules found" in config.stdout, config.stdout + config.stderr
    # each alert fires on its condition and not below it (synthetic series)
    tested = subprocess.run([_tool(PROMTOOL), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.fixture(scope="module")
def settings(infra: Infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None, seed=4,
                    api=f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def prometheus(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's Prometheus scraping the API every second and evaluating the shipped rules every second."""
    home = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "privads", "static_configs": [
            {"targets": [f"{settings.api_host}:{settings.api_port}"]}]}]}))
    port = free_port()
    proc = Process("prometheus", [_tool(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={home / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{port}"],
                   home / "prometheus.log", ready=lambda: port_open("127.0.0.1", port))
    proc.start(timeout=60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(10)
        wait_port_free("127.0.0.1", port)


def _alert_state(prom: str, name: str) -> str:
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return next((a["state"] for a in alerts if a["labels"]["alertname"] == name), "inactive")


def test_a_real_prometheus_scrapes_the_stack_and_fires_the_dead_letter_alert(
        infra: Infra, settings: Settings, rds: redis.Redis, prometheus: str) -> None:
    with serving(infra, settings, rds, ADS) as c:
        def scraped() -> bool:  # the counter at its value before the burst, so that increase() sees the burst
            got = httpx.get(f"{prometheus}/api/v1/query", params={"query": "privads_dead_letters_total"},
                            timeout=5).json()["data"]["result"]
            return bool(got) and float(got[0]["value"][1]) == 0.0

        wait_until(scraped, 60, "Prometheus to scrape privads_dead_letters_total at 0")
        assert _alert_state(prometheus, "PrivAdsDeadLetters") == "inactive"
        # every shipped rule evaluates on the real metrics without an error
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 9 and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                                           for r in rules]

        # the provocation: a burst of events no decoder accepts, which the workers dead-letter
        produce(infra.kafka, records.IMPRESSIONS, [(f"bad-{i}", b"{not json") for i in range(BURST)])
        wait_until(lambda: f"privads_dead_letters_total {BURST}.0" in c.get("/metrics").text, 60,
                   "the workers to dead-letter the burst")
        # the dashboard's last reasons: topic, offset and why, never the payload
        recent = c.get("/stream").json()["recent_dead_letters"]
        assert len(recent) == 5 and all(d["topic"] == records.IMPRESSIONS for d in recent)
        assert all("JSON" in d["error"] and "{not json" not in d["error"] for d in recent), recent[0]
        wait_until(lambda: _alert_state(prometheus, "PrivAdsDeadLetters") == "firing", 60,
                   "Prometheus to fire PrivAdsDeadLetters")
        alert = next(a for a in httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
                     if a["labels"]["alertname"] == "PrivAdsDeadLetters")
        assert alert["labels"]["severity"] == "warning" and float(alert["value"]) > 100
        # the others stay quiet on a healthy stack
        firing = {a["labels"]["alertname"] for a in httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()[
            "data"]["alerts"] if a["state"] == "firing"}
        assert firing == {"PrivAdsDeadLetters"}
