"""The embedded broker with its log on the S3 object store: a SIGKILLed broker, restarted, loses no event.

The worker is frozen (SIGSTOP) while a burst is produced and acknowledged, so at the
broker's kill every event of the burst is in the broker's log and none is consumed:
a broker that kept its log in memory would lose all of them (and the consumer group's
offsets). Restarted on the same object store, the broker must hand the worker every
event once, from the committed offsets on.

The events come in bursts, not as a steady trickle: tansu stores each produced batch as
one object and serves about 30 of them a second from the embedded object store
(BENCHMARKS.md, "the durable broker"), so a trickle of one-record batches outruns it.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis

from faults.harness import (
    Box,
    Fleet,
    KafkaStream,
    Progress,
    check,
    drain_archive,
    load_catalog,
    quiesce,
    record,
    wait_for,
)
from helpers import sample_ads
from privads.infra import keys, records
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming", "gardening", "coffee & tea"], per_category=4)
BURST = 1000


@pytest.mark.parametrize("box", ["s3"], indirect=True)
def test_sigkill_the_durable_broker_with_unconsumed_events_then_restart(box: Box, fsettings: Settings, fleet: Fleet,
                                                                        r: redis.Redis) -> None:
    w = fleet.worker("worker")
    load_catalog(box, r, ADS)
    progress = Progress(fsettings.redis_url)
    stream = KafkaStream(box.kafka, ADS, tag="db", users=60, rate=0.0, linger_ms=100)
    fleet.streams.append(stream)
    stream.start()
    stream.burst(BURST)  # consumed before the kill
    wait_for(lambda: stream.sent() >= BURST, 30, "the first burst to be acknowledged")
    stream.pause()
    processed = lambda: int(r.hget(keys.STATS, f"processed:{records.IMPRESSIONS}") or 0)  # noqa: E731
    wait_for(lambda: processed() >= BURST, 120, "the first burst to be consumed")
    w.signal(signal.SIGSTOP)
    try:
        stream.resume()
        stream.burst(BURST)  # in the broker's log only, at the kill
        wait_for(lambda: stream.sent() >= 2 * BURST, 30, "the second burst to be acknowledged")
        stream.pause()
        before = progress.committed()
        unconsumed = sum(o for o in stream.end_offsets.values()) - sum(before.values())
        killed_at = time.time()
        box.restart_broker()
    finally:
        w.signal(signal.SIGCONT)
    assert unconsumed >= BURST, f"only {unconsumed} events were unconsumed at the kill"
    recovery = progress.recovery(before, killed_at, timeout=120)
    ledger = stream.stop()
    waited = quiesce(r, ledger, timeout=180)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger)
    record("SIGKILL the broker (log on S3) with events unconsumed, restart", recovery, out,
           quiesce_s=round(waited, 1), unconsumed_at_the_kill=unconsumed)
    assert w.poll() is None, "the worker died with the broker"
    out.require()

