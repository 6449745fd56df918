"""POST /recommend."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from privads.api.deps import MetricsDep, RecommenderDep

router = APIRouter(tags=["recommend"])

MAX_CONTEXT_KEYS = 32


class RecommendRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=128, strict=True, description="pseudonymous user id")
    k: int = Field(10, ge=1, le=100, strict=True, description="number of ads (at most 100)")
    context: dict[Annotated[str, Field(max_length=64)], Any] = Field(
        default_factory=dict, max_length=MAX_CONTEXT_KEYS,
        description="request context, e.g. {\"device\": \"mobile\"}; scalar values become ranker features")


class RecommendedAd(BaseModel):
    ad_id: str
    position: int
    score: float
    propensity: float
    impression_id: str


class RecommendResponse(BaseModel):
    request_id: str
    policy: str
    model_version: str | None
    ads: list[RecommendedAd]


@router.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, recommender: RecommenderDep, metrics: MetricsDep) -> Response:
    """Top-k ads for a user; one impression per returned ad is logged to Kafka."""
    rec = await recommender.recommend(body.user_id, body.k, body.context)
    metrics.recommendations.labels(policy=rec.policy).inc()
    metrics.recommended_ads.labels(policy=rec.policy).inc(len(rec.ads))
    # serialised directly (the shape is RecommendResponse's, checked by the tests): the hot path skips re-validation
    return Response(orjson.dumps({
        "request_id": rec.request_id, "policy": rec.policy, "model_version": rec.model_version,
        "ads": [{"ad_id": a.ad_id, "position": a.position, "score": a.score, "propensity": a.propensity,
                 "impression_id": a.impression_id} for a in rec.ads]}), media_type="application/json")
