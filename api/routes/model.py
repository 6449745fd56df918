"""GET /model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from privads.api.deps import RecommenderDep

router = APIRouter(tags=["model"])


@router.get("/model")
async def model(recommender: RecommenderDep) -> dict[str, Any]:
    """Versions and sizes of the served projector, ranker and index."""
    return {**recommender.model_info(), "quality": await recommender.quality(), "privacy": await recommender.privacy()}


class Gate(BaseModel):
    trained: bool = Field(description="whether a candidate was trained this cycle (enough labelled impressions)")
    promoted: bool = Field(description="whether the candidate passed the gate and is this version's")
    reason: str | None = Field(description="the gate's verdict, or why nothing was trained")
    candidate: dict[str, float] | None = None  # holdout figures (AUC, log-loss, …)
    served: dict[str, float] | None = None


class VersionOut(BaseModel):
    version: str
    built_at: float | None
    reason: str | None = Field(description="why the cycle ran: scheduled, drift, catalog, …")
    changed: list[str]
    projector: Gate
    ranker: Gate
    swapped_at: float | None = Field(description="when this API process started serving it (None: not here)")


@router.get("/model/history", response_model=list[VersionOut])
async def model_history(recommender: RecommenderDep,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[VersionOut]:
    """The newest model versions, oldest first: each gate's verdict and figures, and when this process swapped."""
    return [VersionOut(**v) for v in await recommender.model_history(limit)]
