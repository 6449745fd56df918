"""Workers joining and leaving during a stream of 200,000 events: every count exact, every click joined once.

Six partitions; one worker at the start, a second and a third join, one leaves (SIGTERM: it
finishes its batch and hands its partitions over), one is SIGKILLed mid-batch, and a fourth
joins; each change is a consumer-group rebalance while events flow at a few thousand a second.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from faults.harness import (
    Box,
    Fleet,
    KafkaStream,
    check,
    drain_archive,
    fault_settings,
    load_catalog,
    quiesce,
    record,
    start_box,
    wait_for,
)
from helpers import sample_ads
from privads.infra import keys
from privads.infra.processes import Process

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming", "gardening", "skincare", "coffee & tea"], per_category=4)
PARTITIONS = 6
EVENTS = 200_000


@pytest.fixture
def box6(tmp_path: Path) -> Iterator[Box]:
    b = start_box(tmp_path, partitions=PARTITIONS)
    try:
        yield b
    finally:
        b.stop()


def owned(r: redis.Redis, worker: Process) -> int:
    """How many partitions ``worker`` says it owns (its heartbeat, keyed by its pid)."""
    for k, v in r.hgetall(keys.WORKERS).items():
        if k.decode().endswith(f"-{worker.pid}"):
            return int(json.loads(v)["partitions"])
    return 0


def test_workers_joining_and_leaving_during_200k_events_keep_every_count_exact(box6: Box) -> None:
    settings = fault_settings(box6, partitions=PARTITIONS, worker_batch=2000)
    fleet = Fleet(settings)
    r = redis.Redis(host="127.0.0.1", port=box6.redis_port)
    try:
        w1 = fleet.worker("w1")
        load_catalog(box6, r, ADS)
        # ~0.3 clicks per impression: 200k events are ~155k impressions, at 3,000 a second
        stream = KafkaStream(box6.kafka, ADS, tag="el", users=2000, rate=3000.0, linger_ms=20)
        fleet.streams.append(stream)
        stream.start()
        changes: list[str] = []
        t0 = time.time()

        def join(name: str) -> Process:
            w = fleet.worker(name)
            wait_for(lambda: owned(r, w) > 0, 60, f"{name} to be given partitions")
            changes.append(f"{time.time() - t0:.0f}s {name} joined")
            return w

        w2 = join("w2")
        w3 = join("w3")
        w1.stop(30)  # SIGTERM: finishes its batch, leaves the group
        changes.append(f"{time.time() - t0:.0f}s w1 left (SIGTERM)")
        time.sleep(2)
        w2.signal(signal.SIGKILL)  # mid-batch, no goodbye: the group notices after its session timeout
        w2.popen.wait(10)  # type: ignore[union-attr]
        changes.append(f"{time.time() - t0:.0f}s w2 killed (SIGKILL)")
        w4 = join("w4")
        wait_for(lambda: len(stream.ledger.impressions) + len(stream.ledger.clicks) >= EVENTS, 300,
                 f"{EVENTS} events to be acknowledged")
        ledger = stream.stop()
        waited = quiesce(r, ledger, timeout=300, partitions=PARTITIONS)
        wait_for(lambda: owned(r, w3) + owned(r, w4) == PARTITIONS, 30, "w3 and w4 to own every partition")
        drain_archive(r, settings.local / "archive", partitions=PARTITIONS)
        out = check(r, settings.local / "archive", ledger)
        record("4 workers join and leave (one SIGTERM, one SIGKILL) over 6 partitions", None, out,
               quiesce_s=round(waited, 1), changes=changes, seconds=round(time.time() - t0))
        assert ledger.events >= EVENTS
        assert w3.poll() is None and w4.poll() is None, "a worker that stayed died"
        out.require()
    finally:
        fleet.stop_all()
        r.close()
