"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document: no input may get a 5xx."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import wait_until
from helpers import produce, sample_ads
from privads.infra import records

pytestmark = pytest.mark.integration
ADS = sample_ads(["insurance", "gaming"], per_category=5, bid=1.0)


def test_schemathesis_finds_no_server_error(infra, settings, api: httpx.Client, tmp_path: Path) -> None:
    from privads.learner.cycle import run_cycle

    produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
    wait_until(lambda: api.get("/healthz").json()["ads"] == len(ADS), 60, "the API to index the catalog")
    # a version published: /readyz's 503 before one is its documented answer (tests/api/test_readiness.py), not an
    # error; fuzzed, the API is ready
    asyncio.run(run_cycle(settings, reason="test"))
    wait_until(lambda: api.get("/readyz").status_code == 200, 30, "the API to be ready")
    base = str(api.base_url).rstrip("/")
    # positive and negative cases for every operation, seeded; /metrics and /dashboard are plain text/HTML
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{base}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "20261201",
         "--generation-database", "none", "--request-timeout", "10", "--workers", "1"],
        capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the run really exercised the API: every operation of the document, hundreds of cases, all passed
    operations = sum(len(v) for v in api.get("/openapi.json").json()["paths"].values())
    tested = re.search(r"Tested:\s+(\d+)", out)
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert tested and int(tested.group(1)) == operations, out[-2000:]
    assert cases and int(cases.group(1)) == int(cases.group(2)) >= 100, out[-2000:]
    assert api.get("/healthz").status_code == 200  # and the API is still up
