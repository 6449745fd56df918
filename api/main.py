"""The FastAPI application: ``create_app(settings)``; ``uvicorn --factory privads.api.main:create_app``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import faiss
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from privads.api.deps import API_KEY_HEADER
from privads.api.metrics import ApiMetrics, refresh_resources
from privads.api.middleware import ObserveAndLimit
from privads.api.routes import ads, clicks, dashboard, health, lift, model, recommend, stream, users
from privads.infra.errors import Conflict, Forbidden, InvalidInput, NotFound, PrivAdsError, Unavailable
from privads.infra.journal import Journal
from privads.infra.kafka import ConfirmingProducer, QueuedProducer
from privads.infra.loops import Step
from privads.infra.migrate import refuse_old_layout
from privads.infra.runtime import keep_freed_memory
from privads.infra.secret import impression_secret
from privads.infra.settings import Settings
from privads.infra.store import Client, connect, refuse_evicting_redis
from privads.ranker.service import Recommender

log = logging.getLogger(__name__)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or str(loc[0] if loc else "body")


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may echo input that holds a lone surrogate, which
    JSON can spell (``\\ud800``) but UTF-8 cannot encode."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
    fields = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return AsciiJSONResponse(status_code=422, content={"error": f"invalid request: {summary}", "fields": fields,
                                                       "detail": errors})


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail), "detail": exc.detail},
                        headers=getattr(exc, "headers", None))


# domain errors become HTTP answers here and nowhere else (the most specific class first)
DOMAIN_STATUS: tuple[tuple[type[PrivAdsError], int], ...] = (
    (InvalidInput, 422), (Forbidden, 403), (NotFound, 404), (Unavailable, 503), (Conflict, 503))


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    status = next((code for cls, code in DOMAIN_STATUS if isinstance(exc, cls)), 500)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(status_code=status, content={"error": str(exc), "detail": type(exc).__name__},
                        headers=headers)


async def _backend_down(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": f"state store unavailable: {exc}", "detail": "redis"},
                        headers={"Retry-After": "1"})


async def _redis_full(_: Request, exc: Exception) -> JSONResponse:
    # Redis at its maxmemory (noeviction) refused a write: the request changed nothing (a transaction is refused
    # whole), and will pass once Redis has room; the events the workers were given wait in Kafka meanwhile
    return JSONResponse(status_code=503, content={"error": f"state store full, nothing was changed; retry later: {exc}",
                                                  "detail": "redis-oom"}, headers={"Retry-After": "5"})


async def _secret(redis: Client, wait_s: float = 30.0) -> bytes:
    """The impression-signing secret, waiting up to ``wait_s`` for a Redis that is still starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await impression_secret(redis)
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def keep_journal(journal: Journal, producer: QueuedProducer, metrics: ApiMetrics,
                       every_s: float = 1.0) -> None:
    """Run forever: seal this process's aged journal segment, and replay the segments of dead processes.

    The replay is a ``Step``: Kafka away is logged once and retried with backoff, while
    sealing (local files only) goes on.
    """
    replay = Step("replaying dead processes' impression journals", log, max_s=30.0)

    async def replay_once() -> None:
        journal.stats.replayed += await producer.replay(journal.directory)

    while True:
        journal.tick()
        metrics.journal_segments.set(journal.stats.segments)
        metrics.mirrored.set("privads_impressions_unjournaled", journal.stats.write_failed)
        await replay.run(replay_once)
        metrics.mirrored.set("privads_impressions_replayed", journal.stats.replayed)
        await asyncio.sleep(every_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings are read here, at start-up, unless given."""
    settings = settings or Settings()
    metrics = ApiMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # concurrent requests already fill the cores; threads inside one request only contend
        keep_freed_memory()
        threadpool_limits(settings.api_threads)
        faiss.omp_set_num_threads(settings.api_threads)
        redis = connect(settings.redis_url)
        journal = Journal(settings.journal_dir) if settings.impression_journal else None
        producer = QueuedProducer(settings.kafka_servers, settings.impression_queue,
                                  linger_ms=1.0 if settings.impression_confirm_s > 0 else 20.0, journal=journal)
        confirmer = ConfirmingProducer(settings.kafka_servers)  # clicks and ads: answered once Kafka has them
        # read once: every request signs or checks impression ids with it, without a Redis round trip
        recommender = Recommender(settings, redis, producer, await _secret(redis), confirmer)
        await refuse_evicting_redis(redis)  # an evicting Redis would lose state silently (README: Resource limits)
        await refuse_old_layout(redis)  # an earlier key layout's state would look like none (README: Redis Cluster)
        await recommender.load_pinned()  # a missing pinned version stops the start-up, with its name
        app.state.recommender = recommender
        follower = asyncio.create_task(recommender.follow(), name="follow-model-and-catalog")
        counts = asyncio.create_task(recommender.follow_counts(), name="follow-ad-counts")
        tasks = [follower, counts]
        if journal is not None:
            tasks.append(asyncio.create_task(keep_journal(journal, producer, metrics), name="keep-journal"))
        try:  # the follower's first pass: a version and the catalog as they are now, when they can be read
            await asyncio.wait_for(recommender.ready.wait(), timeout=30)
        except TimeoutError:
            pass
        ready, state = recommender.readiness()
        if not ready:  # alive (/healthz) but not ready (/readyz says why until it is)
            log.warning("not ready yet: %s; serving the initial projector over the catalog log meanwhile",
                        state["reason"])
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(producer.close, 10.0)
            if journal is not None:  # after the flush: what Kafka has is deleted, the rest is left for a replay
                journal.close()
            await asyncio.to_thread(confirmer.close, 5.0)
            await redis.aclose()

    app = FastAPI(title="PrivAds", version="0.1.0", lifespan=lifespan,
                  description="Streaming, online-learning, privacy-preserving ad recommender.")
    app.state.settings = settings
    app.state.metrics = metrics

    async def refresh_metrics() -> None:
        rec: Recommender = app.state.recommender
        mirrored = metrics.mirrored
        metrics.impressions_queued.set(rec.producer.depth)
        mirrored.set("privads_impressions_dropped", rec.producer.dropped)
        mirrored.set("privads_produce_failed", rec.producer.failed)
        mirrored.set("privads_impressions_unconfirmed", rec.unconfirmed)
        info = rec.model_info()
        metrics.catalog_size.set(info["index"]["size"])
        metrics.model.info({"version": str(info["version"])})
        if info["built_at"] is not None:
            metrics.model_built.set(float(info["built_at"]))
        metrics.learner_interval.set(settings.learner_interval_s)
        quality = await rec.quality()
        mirrored.set("privads_drift", quality["drifts"])
        if quality["auc"] is not None:
            metrics.online_auc.set(quality["auc"])
            metrics.online_log_loss.set(quality["log_loss"])
        privacy = await rec.privacy()
        if privacy["differential_privacy"]:
            metrics.dp_epsilon.set(privacy["epsilon"])
        stream = await rec.stream_counts()
        for topic, n in stream.processed.items():
            mirrored.set("privads_events_processed", n, topic)
        mirrored.set("privads_dead_letters", stream.dead_letters)
        mirrored.freshness_ms = stream.freshness_ms
        for topic, n in (await rec.consumer_lag()).items():
            metrics.consumer_lag.labels(topic=topic).set(n)
        await refresh_resources(metrics, rec.users)

    app.state.refresh_metrics = refresh_metrics

    # starlette's stub types every handler as taking any Exception, not the class it is registered for
    # (Kludex/starlette#2417)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RedisConnectionError, _backend_down)
    app.add_exception_handler(RedisTimeoutError, _backend_down)
    app.add_exception_handler(OutOfMemoryError, _redis_full)
    app.add_exception_handler(PrivAdsError, _domain_error)
    for module in (recommend, clicks, ads, users, lift, model, health, stream, dashboard):
        app.include_router(module.router)
    if settings.cors_origins:  # off unless configured: the API is called by servers, not browsers
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "PUT",
                           "DELETE"], allow_headers=["Content-Type", API_KEY_HEADER])
    app.add_middleware(ObserveAndLimit, metrics=metrics, timeout_s=settings.request_timeout_s,
                       max_body_bytes=settings.max_body_bytes)
    return app
