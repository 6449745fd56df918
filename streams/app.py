"""The Faust stream worker: thin agents over ``streams.services``.

Every agent reads raw bytes, decodes at the boundary (bad messages go to the
dead-letter topic with a reason), drops duplicates, calls one service, writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import faust

from infra.settings import Settings
from infra.store import (
    AttributionStore,
    CatalogStore,
    ModelPointer,
    UserStore,
    WorkerRegistry,
    connect,
    count_processed,
    first_seen,
)
from learner.encoder import AdEncoder
from streams import records
from streams.records import InvalidEvent
from streams.services import AdVectors, CatalogIndexer, UserLearner

log = logging.getLogger(__name__)

BATCH = 2000
WITHIN_S = 0.05


def faust_settings(settings: Settings) -> dict[str, Any]:
    """Faust configuration, tuned so that group joins take seconds, not the default 30+."""
    return dict(
        broker=[f"kafka://{s.strip()}" for s in settings.kafka_servers.split(",")],
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        broker_rebalance_timeout=5,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        consumer_auto_offset_reset="earliest",
        producer_linger_ms=5,
        broker_commit_interval=1.0,
    )


def create_app(settings: Settings) -> faust.App:
    """Build the worker app and its agents for these settings."""
    app = faust.App(records.WORKER_GROUP, **faust_settings(settings))
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    impressions = app.topic(records.IMPRESSIONS, **raw)
    clicks = app.topic(records.CLICKS, **raw)
    ads = app.topic(records.ADS, **raw)
    labelled = app.topic(records.LABELLED, **raw)
    dead_letters = app.topic(records.DEAD_LETTER, **raw)

    r = connect(settings.redis_url)
    catalog = CatalogStore(r)
    attribution = AttributionStore(r, settings.attribution_window_s)
    ad_vectors = AdVectors(settings, catalog, ModelPointer(r))
    indexer = CatalogIndexer(catalog, AdEncoder())
    learner = UserLearner(settings, UserStore(r), ad_vectors)

    async def valid(topic: str, events: Sequence[faust.EventT]) -> list[Any]:
        """Decoded records of a batch, first occurrence of each event id only."""
        await count_processed(r, topic, len(events))
        good = []
        for ev in events:
            try:
                good.append(records.decode(topic, ev.value).record)
            except InvalidEvent as e:
                msg = ev.message
                await dead_letters.send(value=records.dead_letter(topic, msg.partition, msg.offset, str(e), ev.value))
        if topic == records.ADS or not good:
            return good
        fresh = await first_seen(r, topic, [g.event_id for g in good], settings.dedupe_ttl_s)
        return [g for g, f in zip(good, fresh) if f]

    async def emit(examples: Sequence[records.Labelled]) -> None:
        for ex in examples:
            await labelled.send(key=ex.user_id.encode(), value=records.encode(ex))

    @app.agent(ads, name="index_ads")
    async def index_ads(stream: faust.StreamT) -> None:
        """Encode and store catalog upserts."""
        async for events in stream.take_events(256, within=WITHIN_S):
            await indexer.upsert(await valid(records.ADS, events))

    @app.agent(impressions, name="attribute_impressions")
    async def attribute_impressions(stream: faust.StreamT) -> None:
        """Hold impressions until clicked or their window closes."""
        async for events in stream.take_events(BATCH, within=WITHIN_S):
            await emit(await attribution.add_impressions(await valid(records.IMPRESSIONS, events)))

    @app.agent(clicks, name="attribute_clicks")
    async def attribute_clicks(stream: faust.StreamT) -> None:
        """Join clicks with their impressions into positives."""
        async for events in stream.take_events(BATCH, within=WITHIN_S):
            await emit(await attribution.add_clicks(await valid(records.CLICKS, events)))

    @app.agent(labelled, name="learn_users")
    async def learn_users(stream: faust.StreamT) -> None:
        """Update user posteriors from labelled impressions."""
        async for values in stream.take(BATCH, within=WITHIN_S):
            await learner.apply([records.decode_labelled(v) for v in values])
            await count_processed(r, records.LABELLED, len(values))

    @app.timer(1.0)
    async def close_windows() -> None:
        """Impressions whose attribution window closed unclicked become negatives."""
        await emit(await attribution.close_windows(time.time()))

    workers = WorkerRegistry(r)
    worker_id = f"{socket.gethostname()}-{os.getpid()}"

    @app.task
    async def warm_encoder() -> None:
        """Load MiniLM in the background so the first catalog batch does not wait for it."""
        await asyncio.get_running_loop().run_in_executor(None, indexer.encoder.warm)

    @app.timer(1.0)
    async def heartbeat() -> None:
        """Tell readers this worker is alive and how many partitions it owns."""
        await workers.beat(worker_id, len(app.consumer.assignment()), time.time())

    @app.timer(1.0)
    async def follow_model() -> None:
        """Project ads with the served model version."""
        await ad_vectors.refresh()

    return app


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the worker in the foreground until SIGTERM/SIGINT."""
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
