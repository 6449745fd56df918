"""`privads up` as a user runs it: starts everything, serves, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from conftest import wait_until
from helpers import SAMPLE_CATALOG
from privads.infra.processes import free_port, port_open

pytestmark = pytest.mark.integration


def processes_with_env(marker: str) -> list[int]:
    """PIDs whose environment contains ``marker`` (the test's unique data dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def argv(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def child(marker: str, role: str) -> int | None:
    """PID of the ``privads <role>`` child among the processes of this test's stack."""
    for pid in processes_with_env(marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"privads" in argv and role.encode() in argv:
            return pid
    return None


def test_up_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    kport, rport, aport = free_port(), free_port(), free_port()
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(SAMPLE_CATALOG.read_text().splitlines()[:40]) + "\n")
    data = tmp_path / "data"
    env = {**os.environ, "PRIVADS_DATA": str(data), "PRIVADS_API": f"http://127.0.0.1:{aport}",
           "PRIVADS_EMBEDDED_KAFKA_PORT": str(kport), "PRIVADS_EMBEDDED_REDIS_PORT": str(rport),
           "PRIVADS_CATALOG": str(catalog), "PRIVADS_REDIS_MAXMEMORY": "256mb"}
    env.pop("PRIVADS_KAFKA", None)
    env.pop("PRIVADS_REDIS", None)
    up = subprocess.Popen([sys.executable, "-m", "privads", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{aport}"
        wait_until(lambda: httpx.get(f"{api}/healthz", timeout=1).status_code == 200, 120, "/healthz")
        active = sum('"active": true' in line for line in catalog.read_text().splitlines())
        wait_until(lambda: httpx.get(f"{api}/healthz", timeout=1).json()["ads"] == active, 60, "the sample catalog")
        r = httpx.post(f"{api}/recommend", json={"user_id": "someone", "k": 4}, timeout=5)
        assert r.status_code == 200 and len(r.json()["ads"]) == 4
        assert (data / "redis" / "appendonlydir").is_dir()  # AOF persistence in the data dir
        with redis.Redis(port=rport) as r:  # the ceiling it was given, and no eviction (README: Resource limits)
            cfg = r.config_get("maxmemory*")
        assert (cfg["maxmemory"], cfg["maxmemory-policy"]) == (str(256 * 2**20), "noeviction")
        # the catalog was stored before the learner's first cycle, which fit the user space to it
        first = min((json.loads(m.read_text()) for m in (data / "models").glob("v*/manifest.json")),
                    key=lambda m: m["built_at"])
        assert first["projector"]["fit"] == "catalog" and first["index"]["size"] == active, first
        assert len(processes_with_env(str(data))) >= 5  # up, broker, redis, worker, learner, api
        # a crashed child is reported and restarted, not silently left
        crashed = child(str(data), "worker")
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)
        wait_until(lambda: child(str(data), "worker") not in (None, crashed), 30, "the worker to be restarted")
    finally:
        up.send_signal(signal.SIGINT)
        stuck = False
        try:
            out, _ = up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stuck = True
            up.kill()
            out, _ = up.communicate()
        # its children are in sessions of their own: killing `up` does not reach them. Whatever of its stack
        # outlives it is noted for the assertion below, then killed here, so that a failure leaves nothing running
        deadline = time.monotonic() + 5
        while (outlived := processes_with_env(str(data))) and time.monotonic() < deadline:
            time.sleep(0.1)
        outlived_argv = [argv(pid) for pid in outlived]
        for pid in outlived:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    log = out.decode(errors="replace")
    assert not stuck, "privads up did not stop within 30 s of Ctrl-C:\n" + log[-3000:]
    assert up.returncode == 0, log[-3000:]
    assert "worker exited with code -9; restarting" in log
    assert outlived == [], f"children outlived privads up: {outlived_argv}"
    assert not [p for p in (kport, rport, aport) if port_open("127.0.0.1", p)], "a port is still open"


def test_up_refuses_a_busy_port_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        env = {**os.environ, "PRIVADS_DATA": str(tmp_path), "PRIVADS_EMBEDDED_KAFKA_PORT": str(busy)}
        env.pop("PRIVADS_KAFKA", None)
        r = subprocess.run([sys.executable, "-m", "privads", "up"], env=env, capture_output=True, timeout=60)
    assert r.returncode != 0
    assert f"port {busy} is in use" in r.stderr.decode()
