"""The stream on a Redis Cluster (3 masters, 3 replicas): a master SIGKILLed mid-stream, its replica takes over,
and every count stays exact.

Each partition commits in its own slot (``infra.keys``: the hash tag ``{p}``) and its global counters reach the
``{g}`` keys through its outbox, folded once a replica holds the commit (``PartitionStore.fold``). A replica
promoted without the last commits of its master makes the owner replay those events from its checkpoint: nothing
drained or folded of them, since neither happens before a replica acknowledged the commit.
"""

from __future__ import annotations

import time

import pytest
import redis

from faults.harness import (
    ApiStream,
    Box,
    Fleet,
    KafkaStream,
    check,
    drain_archive,
    load_catalog,
    quiesce,
    record,
    wait_for,
)
from helpers import sample_ads
from privads.infra import keys, records
from privads.infra.redis_cluster import CLUSTER_SLOTS
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming", "gardening", "coffee & tea"], per_category=4)


@pytest.mark.parametrize("box", ["cluster"], indirect=True)
def test_a_redis_master_killed_mid_stream_fails_over_and_every_count_stays_exact(
        box: Box, fsettings: Settings, fleet: Fleet, r: redis.RedisCluster) -> None:
    assert box.cluster is not None and len(box.cluster.masters()) == 3
    fleet.worker("worker")
    load_catalog(box, r, ADS)
    stream = KafkaStream(box.kafka, ADS, tag="cf", users=300, rate=400.0)
    fleet.streams.append(stream)
    stream.start()
    processed = lambda: int(r.hget(keys.STATS, f"processed:{records.IMPRESSIONS}") or 0)  # noqa: E731
    wait_for(lambda: processed() >= 1500, 60, "the stream to be under way")
    # the master of partition 0's slot: its checkpoint, pending impressions and users fail over with it
    slot = r.keyslot(keys.checkpoint(0))
    victim = box.cluster.masters()[slot * 3 // CLUSTER_SLOTS]
    before = processed()
    t0 = time.time()
    promoted = box.cluster.kill_master(victim)
    failover_s = time.time() - t0
    wait_for(lambda: processed() >= before + 1500, 90, "the stream to go on after the failover")
    ledger = stream.stop()
    waited = quiesce(r, ledger, timeout=120)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger)
    record("Redis Cluster master SIGKILLed mid-stream", None, out, failover_s=round(failover_s, 1),
           quiesce_s=round(waited, 1), killed=victim, promoted=promoted)
    assert promoted in box.cluster.masters()
    out.require()



# the API under load while the master of the global counters' slot ({g}: per-arm and per-ad counts, the log the
# API follows) dies: requests caught in the failover may fail (5xx), none is refused as bad input, the API answers
# again without a restart, and every impression it answered is counted once
@pytest.mark.parametrize("box", ["cluster"], indirect=True)
def test_the_api_under_load_rides_out_a_master_failover(box: Box, fsettings: Settings, fleet: Fleet,
                                                        r: redis.RedisCluster) -> None:
    assert box.cluster is not None
    fleet.worker("worker")
    load_catalog(box, r, ADS)
    fleet.api("api")
    clients = ApiStream(fsettings.api)
    fleet.streams.append(clients)
    clients.start()
    wait_for(lambda: clients.answered >= 50, 30, "the API to answer")
    victim = box.cluster.masters()[r.keyslot(keys.STATS) * 3 // CLUSTER_SLOTS]
    killed_at = time.time()
    box.cluster.kill_master(victim)
    served = clients.answered
    wait_for(lambda: clients.answered >= served + 100, 60, "the API to answer again after the failover")
    recovery = time.time() - killed_at
    ledger = clients.stop()
    waited = quiesce(r, ledger, timeout=120)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger, resent=True)
    record("Redis Cluster master of {g} SIGKILLed under API load", recovery, out, quiesce_s=round(waited, 1),
           unanswered=len(ledger.unanswered), answered=clients.answered, failed=dict(clients.failed))
    assert not clients.errors, clients.errors[:5]
    assert set(clients.failed) <= {503}, clients.failed  # Redis away is "try again", never a 500
    assert len(ledger.impressions) > 300
    out.require()
