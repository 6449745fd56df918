"""Alive is not ready: /readyz answers 503 with what is missing until a model version and the catalog are loaded,
and `privads up` says it serves only once /readyz is 200, so the first /recommend after it returns ads."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from conftest import seed_encoder, start_api, start_worker, wait_until
from helpers import SAMPLE_CATALOG, produce, sample_ads
from privads.cli.supervisor import READY_LINE, Stack
from privads.infra import keys, records
from privads.infra.processes import Process, free_port, port_open, start_private_infra
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
ADS = sample_ads(["gardening", "coffee & tea"], per_category=6)
assert len(ADS) == 12


@pytest.fixture(scope="module")
def stack(settings: Settings, rds: redis.Redis) -> Iterator[tuple[Process, Process]]:
    """A worker and an API on a fresh broker and Redis, with no model version published."""
    worker = start_worker(settings, rds)
    try:
        api = start_api(settings)
    except BaseException:
        worker.stop(20)
        raise
    yield worker, api
    api.stop(20)
    worker.stop(20)


def readyz(settings: Settings) -> httpx.Response:
    return httpx.get(f"{settings.api}/readyz", timeout=5)


def publish(settings: Settings) -> dict:
    """One learner cycle, in this process, as `privads train` runs it."""
    from privads.learner.cycle import run_cycle

    return asyncio.run(run_cycle(settings, reason="test"))


def test_ready_only_with_a_model_version_and_the_catalog(infra, settings: Settings, rds: redis.Redis, stack,
                                                         capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # alive, not ready: nothing published yet
    assert httpx.get(f"{settings.api}/healthz", timeout=5).status_code == 200
    r = readyz(settings)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    body = r.json()
    assert body["status"] == "not ready" and body["model_version"] is None
    assert "no model version loaded" in body["reason"] and "model:current is unset" in body["reason"], body

    # `privads up`'s wait, against this API: no ready line while /readyz is 503, and the reason logged once
    caplog.set_level(logging.INFO, logger="privads.up")
    watcher = Stack(settings)
    line = READY_LINE.format(api=settings.api, logs="test")
    supervising = threading.Thread(target=watcher.supervise, args=(line,), daemon=True)
    supervising.start()
    try:
        # the catalog is indexed by the worker and followed by the API over the initial projector: still not ready,
        # and what is missing is named
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the worker to store the catalog")
        wait_until(lambda: httpx.get(f"{settings.api}/healthz", timeout=5).json()["ads"] == len(ADS), 30,
                   "the API to follow the catalog")
        r = readyz(settings)
        assert r.status_code == 503 and "no model version loaded" in r.json()["reason"], r.json()
        assert r.json()["ads"] == len(ADS)
        assert line not in capsys.readouterr().out
        waits = [m for m in caplog.messages if m.startswith("waiting for the API to be ready")]
        assert len(waits) == 1 and "/readyz answered 503: no model version loaded" in waits[0], waits

        manifest = publish(settings)
        body = wait_until(lambda: (b := readyz(settings).json()).get("status") == "ready" and b, 30,
                          "/readyz to answer 200")
        assert isinstance(body, dict)
        assert body["model_version"] == manifest["version"] and body["ads"] == len(ADS)
        assert body["skipped"] is None and "reason" not in body
        rec = httpx.post(f"{settings.api}/recommend", json={"user_id": "first", "k": 4}, timeout=5).json()
        assert len(rec["ads"]) == 4 and rec["model_version"] == manifest["version"]
        printed = wait_until(lambda: line in (out := capsys.readouterr().out) and out, 10, "the ready line")
        assert isinstance(printed, str) and printed.count(line) == 1
        assert readyz(settings).status_code == 200  # ready stays ready
    finally:
        watcher.stopping = True
        supervising.join(10)
    assert not supervising.is_alive()


def test_up_prints_the_ready_line_only_when_ready(tmp_path: Path) -> None:
    """`privads up` over a Redis whose model:current names a version that is gone (a data dir lost, say): the API
    is alive at once but ready only once the learner's first cycle has published a version it can read; the
    ready line waits for that, and the first /recommend after it returns k ads."""
    procs: list[Process] = []
    up: subprocess.Popen[bytes] | None = None
    try:
        kafka, redis_url = start_private_infra(tmp_path / "infra", procs)
        catalog = tmp_path / "catalog.jsonl"
        catalog.write_text("\n".join(SAMPLE_CATALOG.read_text().splitlines()[:40]) + "\n")
        data = tmp_path / "data"
        gone = {"version": "v1000000000000", "path": str(data / "models" / "v1000000000000"), "built_at": 1e9,
                "catalog_change": "0-0", "projector": {"type": "linear", "fit": "catalog"},
                "ranker": {"type": "thompson-logistic"}, "index": {"type": "Flat", "size": 40}}
        with redis.Redis.from_url(redis_url) as r:
            r.set(keys.MODEL_CURRENT, json.dumps(gone))
        aport = free_port()
        api = f"http://127.0.0.1:{aport}"
        env = {**os.environ, "PRIVADS_DATA": str(data), "PRIVADS_API": api, "PRIVADS_KAFKA": kafka,
               "PRIVADS_REDIS": redis_url, "PRIVADS_CATALOG": str(catalog), "PRIVADS_CONTROL_SHARE": "0"}
        seed_encoder(Settings(kafka=kafka, redis=redis_url, data=str(data)))  # a first start is test_up's
        up = subprocess.Popen([sys.executable, "-m", "privads", "up"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        seen: list[str] = []
        at_line: dict[str, object] = {}

        def read() -> None:
            """Collect the output; the moment the ready line comes, ask /readyz and /recommend (nothing between)."""
            assert up is not None and up.stdout is not None
            for raw in up.stdout:
                text = raw.decode(errors="replace")
                seen.append(text)
                if text.startswith("PrivAds is serving on") and not at_line:
                    try:
                        at_line["readyz"] = httpx.get(f"{api}/readyz", timeout=5).json()
                        at_line["recommend"] = httpx.post(f"{api}/recommend", json={"user_id": "first", "k": 4},
                                                          timeout=5).json()
                    except httpx.HTTPError as e:
                        at_line["error"] = repr(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: at_line or up.poll() is not None, 150, "privads up's ready line")
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)
            reader.join(10)
        log = "".join(seen)
        assert up.returncode == 0 and at_line, log[-3000:]
        assert "error" not in at_line, at_line
        ready = at_line["readyz"]
        assert isinstance(ready, dict) and ready["status"] == "ready", ready
        assert ready["model_version"] not in (None, gone["version"]) and ready["skipped"] is None, ready
        rec = at_line["recommend"]
        assert isinstance(rec, dict) and len(rec["ads"]) == 4 and rec["model_version"] == ready["model_version"], rec
        assert log.count("PrivAds is serving on") == 1
        # the API was started (alive) before the line, which waited for /readyz, not /healthz; any wait it logged
        # named the unreadable version, and came before the line
        assert log.index("/healthz") < log.index("PrivAds is serving on")
        waited = log.find("waiting for the API to be ready")
        assert waited < log.index("PrivAds is serving on")
        if waited >= 0:
            assert f"model:current names {gone['version']}, which cannot be read" in log[waited:], log[waited:][:600]
        manifest = json.loads((data / "models" / ready["model_version"] / "manifest.json").read_text())
        assert manifest["parent"] == gone["version"] and manifest["recovered"]["unreadable"], manifest
        time.sleep(0.5)
        assert not port_open("127.0.0.1", aport), "the API's port is still open"
    finally:
        if up is not None and up.poll() is None:
            up.kill()
            up.wait(10)
        for p in reversed(procs):
            p.stop(10)
