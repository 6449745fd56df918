"""Exactly-once when two workers apply the same partition during a rebalance (issue 17, item 7).

Two ``EventAgent`` instances in this process share a real redis-server and broker. The second one plans a batch,
the first one commits the front half of the same records meanwhile, and the second one's commit then conflicts: its
re-plan must drop what the first one applied, so every record is counted once and the offsets only move forward.
The race is placed deterministically: the second agent's commit runs the first agent's batch before it goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from helpers import impression
from privads.infra import keys, records
from privads.infra.kafka import async_producer_config
from privads.infra.partitioning import owner
from privads.infra.settings import Settings
from privads.infra.store import CatalogStore, ModelPointer, connect
from privads.streams.services import AdVectors
from privads.streams.worker import EventAgent

pytestmark = pytest.mark.integration
N = 200


def records_for(partition: int, partitions: int, n: int) -> list[ConsumerRecord[bytes, bytes]]:
    """``n`` impressions of users owned by ``partition``, as the consumer would hand them over."""
    out: list[ConsumerRecord[bytes, bytes]] = []
    while len(out) < n:
        user = f"u-{uuid.uuid4().hex[:10]}"
        if owner(user.encode(), partitions) != partition:
            continue
        value = json.dumps(impression(user, "ad-1")).encode()
        out.append(ConsumerRecord(topic=records.IMPRESSIONS, partition=partition, offset=len(out),
                                  timestamp=int(time.time() * 1000) + len(out), timestamp_type=0, key=user.encode(),
                                  value=value, checksum=None, serialized_key_size=len(user),
                                  serialized_value_size=len(value), headers=()))
    return out


def test_a_batch_that_raced_another_worker_applies_only_what_that_worker_did_not(infra, settings: Settings,
                                                                                 rds: redis.Redis) -> None:
    recs = records_for(0, settings.partitions, N)
    tp = TopicPartition(records.IMPRESSIONS, 0)

    async def go() -> None:
        r = connect(settings.redis_url)
        producer = AIOKafkaProducer(**async_producer_config(settings.kafka_servers))
        await producer.start()
        try:
            agents = []
            for _ in range(2):
                agent = EventAgent(settings, r, producer, AdVectors(settings, CatalogStore(r), ModelPointer(r)))
                agent.owned = {0, 1}  # both believe they own partition 0: a rebalance in flight
                agent.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_servers)  # commits are advisory
                agents.append(agent)
            first, second = agents
            commit, raced = second.store.commit, []

            async def commit_after_the_other_worker(*args, **kwargs):  # type: ignore[no-untyped-def]
                if not raced:
                    raced.append(True)
                    await first.step({tp: recs[:N // 2]}, False)  # lands between the read and the commit
                return await commit(*args, **kwargs)

            second.store.commit = commit_after_the_other_worker  # type: ignore[method-assign]
            await second.step({tp: recs}, False)
            assert raced
        finally:
            await producer.stop()
            await r.aclose()

    asyncio.run(go())
    stats = {k.decode(): int(v) for k, v in rds.hgetall(keys.STATS).items()}
    assert stats["processed:privads.impressions"] == N  # not N + N/2: the re-plan dropped the applied half
    assert stats["impressions"] == N and stats.get("duplicate_impressions", 0) == 0
    minutes = rds.scan_iter(keys.arm("treatment", 0).removesuffix("0") + "*")
    arm = sum(int(rds.hget(k, "impressions") or 0) for k in minutes)
    assert arm == N
    assert int(rds.hget(keys.checkpoint(0), f"off:{records.IMPRESSIONS}")) == N
    archived = sum(e[b"imp"].count(b"\n") + 1 for _, e in rds.xrange(keys.archive(0)) if e.get(b"imp"))
    assert archived == N
