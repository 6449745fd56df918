"""Integration fixtures: a real tansu broker and a real redis-server on free ports.

Each test module that asks for ``infra`` gets its own broker and redis-server
(both start in well under a second), so modules never see each other's events
or state. PrivAds' own processes (worker, API) run as real subprocesses.

Every fixture and test stops what it starts in a ``finally`` (or after its ``yield``,
once the start succeeded): the run fails if a process it started outlives it
(``tests/leakcheck.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from privads.infra.kafka import create_topics
from privads.infra.processes import (
    Process,
    broker_process,
    free_port,
    object_store_process,
    python_process,
    redis_process,
    wait_port_free,
)
from privads.infra.settings import Settings

pytest_plugins = ("leakcheck",)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CATALOG = REPO / "data" / "sample_ads.jsonl"


@dataclass
class Infra:
    kafka: str
    redis_url: str
    data: Path
    broker: Process
    redis: Process


@dataclass
class S3:
    """A real S3-compatible server (localbucket) of a test module's own, with an empty bucket ``bucket``."""

    endpoint: str
    bucket: str
    root: Path  # the server's directory: one folder per bucket, one file per object

    def settings(self, prefix: str, **kw: object) -> dict[str, object]:
        """Settings keywords that put PRIVADS_DATA on this server, below ``prefix``."""
        return {"data": f"s3://{self.bucket}/{prefix}", "aws_endpoint_url": self.endpoint,
                "aws_access_key_id": "privads", "aws_secret_access_key": "privads", **kw}


@contextlib.contextmanager
def s3_server(directory: Path, bucket: str = "privads") -> Iterator[S3]:
    """Start a localbucket server on a free loopback port; stopped (and its port freed) on exit."""
    port = free_port()
    (directory / "s3" / bucket).mkdir(parents=True)  # a bucket is a folder, made before the server starts
    server = object_store_process(port, directory / "s3", directory / "object-store.log")
    try:
        server.start(30)
        yield S3(f"http://127.0.0.1:{port}", bucket, directory / "s3")
    finally:
        server.stop(10)
        wait_port_free("127.0.0.1", port)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 0.1) -> object:
    """Poll ``check`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_error = e
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    data = tmp_path_factory.mktemp("privads")
    kport, rport = free_port(), free_port()
    kafka = f"127.0.0.1:{kport}"
    box = Infra(kafka, f"redis://127.0.0.1:{rport}/0", data, broker_process(kport, data / "logs" / "broker.log"),
                redis_process(rport, data / "redis", data / "logs" / "redis.log"))
    try:  # started inside: a failed start still stops what did start
        box.broker.start(timeout=30)
        box.redis.start(timeout=30)
        create_topics(kafka, partitions=2)
        yield box
    finally:
        # the ones running now: a recovery test may have replaced the first broker or redis-server with new ones
        box.redis.stop(10)
        box.broker.stop(10)
        wait_port_free("127.0.0.1", kport)


@pytest.fixture(scope="module")
def settings(infra: Infra) -> Settings:
    return Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2,
                    control_share=0.0, catalog=None, seed=7, api=f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def rds(infra: Infra) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(infra.redis_url)
    yield r
    r.close()


def _worker_ready(r: redis.Redis, since: float) -> bool:
    beats = [json.loads(v) for v in r.hgetall("workers").values()]
    return any(b["ts"] >= since and b["partitions"] > 0 for b in beats)


_ENCODER_EXPORT: list[Path] = []  # the session's directory for the encoder's export (``seed_encoder``)


@pytest.fixture(scope="session", autouse=True)
def _encoder_export(tmp_path_factory: pytest.TempPathFactory) -> None:
    _ENCODER_EXPORT[:] = [tmp_path_factory.mktemp("encoder-export")]


def seed_encoder(settings: Settings) -> None:
    """Put the encoder's int8 ONNX export where ``settings``' worker looks for it, as on a host that has run before.

    The export is made once per session (in a subprocess: the model stays out of
    this process) and linked into each test's data directory. A fresh export takes
    ~11 s on 2 cores, and most integration modules and every fault test start a
    worker in a data directory of their own. Making it is tested where it is the point:
    ``tests/ranker/test_encoder.py``, and ``tests/cli/test_up.py`` (a first
    ``privads up``).
    """
    if settings.encoder_backend != "onnx-int8" or not _ENCODER_EXPORT:
        return
    from privads.ranker.encoder import ONNX_FILE

    made, dest = _ENCODER_EXPORT[0] / ONNX_FILE, settings.models_dir / "encoder" / ONNX_FILE
    if dest.exists():  # a second worker in the same data directory
        return
    if not made.is_file():
        make = ("import sys; from pathlib import Path; from privads.ranker.encoder import AdEncoder; "
                "AdEncoder('onnx-int8', Path(sys.argv[1])).warm()")
        subprocess.run([sys.executable, "-c", make, str(made.parent)], check=True, timeout=300, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(made, dest)  # the encoder replaces its file, never writes into it: a link is a copy here
    except OSError:
        shutil.copyfile(made, dest)


def start_worker(settings: Settings, r: redis.Redis, name: str = "worker") -> Process:
    """A real stream worker subprocess, returned once it owns partitions."""
    seed_encoder(settings)
    since = time.time()
    p = python_process(name, ["worker"], settings.local / "logs" / f"{name}.log", settings.child_env(),
                       ready=lambda: _worker_ready(r, since))
    p.start(timeout=90)
    return p


@contextlib.contextmanager
def stopping() -> Iterator[list[Process]]:
    """A list for the processes a test starts: each is stopped on the way out, whatever happened, last first.

    Append each one as soon as its start returns (a start that fails stops its own child).
    """
    procs: list[Process] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop(20)


def start_api(settings: Settings) -> Process:
    """A real API subprocess (uvicorn), returned once /healthz answers."""
    p = python_process("api", ["api"], settings.local / "logs" / "api.log", settings.child_env(),
                       ready=lambda: httpx.get(f"{settings.api}/healthz", timeout=1).status_code == 200)
    p.start(timeout=90)
    return p


@contextlib.contextmanager
def serving(infra: Infra, settings: Settings, r: redis.Redis, ads: list[dict]) -> Iterator[httpx.Client]:
    """A worker and an API of their own, the catalog ``ads`` produced and indexed; both stopped on the way out."""
    from helpers import produce  # beside this file, as the tests import it

    with stopping() as procs:
        procs.append(start_worker(settings, r))
        procs.append(start_api(settings))
        with httpx.Client(base_url=settings.api, timeout=10) as c:
            produce(infra.kafka, "privads.ads", [(a["ad_id"], a) for a in ads])
            wait_until(lambda: c.get("/healthz").json()["ads"] == len(ads), 60, "the catalog")
            yield c


@pytest.fixture(scope="module")
def worker(settings: Settings, rds: redis.Redis) -> Iterator[Process]:
    p = start_worker(settings, rds)
    try:
        yield p
    finally:
        p.stop(20)


@pytest.fixture(scope="module")
def api(settings: Settings, worker: Process) -> Iterator[httpx.Client]:
    p = start_api(settings)
    try:
        with httpx.Client(base_url=settings.api, timeout=10) as client:
            yield client
    finally:
        p.stop(20)
