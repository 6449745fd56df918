"""Hostile events under a steady stream: the loop refuses them with a reason and counts everything else exactly.

Mid-stream, impressions stamped in milliseconds (each one would move its partition's clock 50,000 years ahead), a
partition clock rewritten to the year 57843 in Redis (a checkpoint damaged before the bound existed), and a burst
of erasures (each bumps its partition's ``seq``: the worker's batches conflict and re-plan). The stream's own events
must come out exactly as in a run without them (``faults.harness.check``): no click late, no window closed early, no
batch applied twice, and each refused event dead-lettered once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from faults.harness import Box, Fleet, KafkaStream, check, drain_archive, load_catalog, quiesce, record
from helpers import impression, produce, read_topic, sample_ads
from privads.infra import keys, records
from privads.infra.settings import Settings
from privads.infra.store import UserStore

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming", "gardening", "skincare", "coffee & tea"], per_category=4)
MS_EVENTS = 5
ERASURES = 600


def test_hostile_events_and_an_erasure_burst_under_a_steady_stream(box: Box, fsettings: Settings, fleet: Fleet,
                                                                    r: redis.Redis) -> None:
    worker = fleet.worker("worker")
    load_catalog(box, r, ADS)
    stream = KafkaStream(box.kafka, ADS, tag="hx")
    fleet.streams.append(stream)
    stream.start()
    time.sleep(2)

    # impressions in milliseconds, of users outside the stream
    bad = [impression(f"ms-{i}", ADS[i]["ad_id"], ts=time.time() * 1000) for i in range(MS_EVENTS)]
    produce(box.kafka, records.IMPRESSIONS, [(b["user_id"], b) for b in bad])
    # a damaged checkpoint: every partition's clock 50,000 years ahead
    future = time.time() * 1000
    for p in range(fsettings.partitions):
        for topic in records.EVENT_TOPICS:
            r.hset(keys.checkpoint(p), f"wm:{topic}", f"{future!r},{time.time()!r}")

    async def erase_burst() -> float:
        client = aioredis.Redis.from_url(fsettings.redis_url)
        gate = asyncio.Semaphore(50)
        users = UserStore(client, fsettings.partitions)

        async def one(u: str) -> None:
            async with gate:
                await users.erase(u, time.time())

        started = time.monotonic()
        try:
            await asyncio.gather(*[one(f"gone-{uuid.uuid4().hex[:8]}") for _ in range(ERASURES)])
        finally:
            await client.aclose()
        return time.monotonic() - started

    burst_s = asyncio.run(erase_burst())
    time.sleep(3)
    ledger = stream.stop()
    quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger, dead_letters=MS_EVENTS)
    record("hostile: ms timestamps, a clock 50,000 years ahead, 600 erasures", None, out,
           erasures_per_s=round(ERASURES / burst_s))
    out.require()
    assert worker.poll() is None
    letters = [d for d in read_topic(box.kafka, records.DEAD_LETTER) if "milliseconds" in d["error"]]
    assert sorted(d["payload"] for d in letters) == sorted(json.dumps(b) for b in bad)
    assert not any(r.zcard(keys.erasing(p)) for p in range(fsettings.partitions))  # every scrub ran
