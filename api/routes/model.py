"""GET /model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from privads.api.deps import RecommenderDep

router = APIRouter(tags=["model"])


@router.get("/model")
async def model(recommender: RecommenderDep) -> dict[str, Any]:
    """Versions and sizes of the served projector, ranker and index."""
    return {**recommender.model_info(), "quality": await recommender.quality(), "privacy": await recommender.privacy()}
