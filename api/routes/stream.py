"""GET /stream: the stream workers' health, and GET /serving: this API process's own load (the dashboard's panels)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from privads.api.deps import RecommenderDep
from privads.api.metrics import ApiMetrics

router = APIRouter(tags=["health"])


class DeadLetterOut(BaseModel):
    ts: float = Field(description="when a worker dead-lettered it")
    topic: str | None = Field(description="the topic the event came from")
    partition: int | None
    offset: int | None
    error: str = Field(description="why (at most 200 characters; the payload is on privads.dead-letters only)")


class StreamOut(BaseModel):
    processed: dict[str, int] = Field(description="events the workers processed, per topic, since the state began "
                                      "(the dashboard's events/s: their change between two reads)")
    dead_letters: int = Field(description="events dead-lettered so far")
    recent_dead_letters: list[DeadLetterOut] = Field(description="the newest few, newest first, with why")
    lag: dict[str, int] = Field(description="records of each topic the live workers have not consumed yet")
    freshness_clicks: int = Field(description="clicks timed from their production to their user's update")
    freshness_p50_ms: float | None
    freshness_p99_ms: float | None


@router.get("/stream", response_model=StreamOut)
async def stream(recommender: RecommenderDep) -> StreamOut:
    """The stream's health: events per topic, dead letters, consumer lag, click → user-state freshness."""
    return StreamOut(**await recommender.stream_health())


class ServingOut(BaseModel):
    requests: int = Field(description="requests this API process answered (every route)")
    recommend_requests: int = Field(description="… of them POST /recommend")
    errors_5xx: int
    recommend_p50_ms: float | None = Field(description="POST /recommend latency quantiles, from the histogram's "
                                           "buckets (its bound at or above the quantile)")
    recommend_p99_ms: float | None
    impressions_dropped: int = Field(description="impressions dropped: the queue to Kafka was full")
    impression_queue: int


@router.get("/serving", response_model=ServingOut)
async def serving(request: Request, recommender: RecommenderDep) -> ServingOut:
    """This API process's load: requests (qps: their change between two reads), /recommend's latency, drops."""
    metrics: ApiMetrics = request.app.state.metrics
    load = metrics.serving()
    producer = recommender.producer
    return ServingOut(requests=load.requests, recommend_requests=load.recommend_requests,
                      errors_5xx=load.errors_5xx, recommend_p50_ms=load.recommend_p50_ms,
                      recommend_p99_ms=load.recommend_p99_ms, impressions_dropped=producer.dropped,
                      impression_queue=producer.depth)
