"""POST /recommend."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import RecommenderDep

router = APIRouter(tags=["recommend"])


class RecommendRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=128, strict=True, description="pseudonymous user id")
    k: int = Field(10, ge=1, le=100, strict=True, description="number of ads")
    context: dict[str, Any] = Field(default_factory=dict)


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
async def recommend(body: RecommendRequest, recommender: RecommenderDep) -> RecommendResponse:
    """Top-k ads for a user; one impression per returned ad is logged to Kafka."""
    rec = await recommender.recommend(body.user_id, body.k, body.context)
    return RecommendResponse(
        request_id=rec.request_id, policy=rec.policy, model_version=rec.model_version,
        ads=[RecommendedAd(ad_id=a.ad_id, position=a.position, score=a.score, propensity=a.propensity,
                           impression_id=a.impression_id) for a in rec.ads])
