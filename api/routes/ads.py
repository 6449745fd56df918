"""PUT /ads/{ad_id}."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from privads.api.deps import KEY_RESPONSES, RecommenderDep, Text, WriteAccess
from privads.infra.records import Ad

router = APIRouter(tags=["ads"])


class AdUpsert(BaseModel):
    text: Text = Field(min_length=1, max_length=2000, strict=True, description="ad text, encoded for cold start")
    bid: float = Field(ge=0, allow_inf_nan=False, description="cost per click")
    category: Text | None = Field(None, max_length=256)
    active: bool = True


class AdAccepted(BaseModel):
    ad_id: str
    status: str = "accepted"


@router.put("/ads/{ad_id}", response_model=AdAccepted, dependencies=[WriteAccess],
            responses=KEY_RESPONSES)
async def upsert_ad(
    ad_id: Annotated[str, Path(min_length=1, max_length=256)], body: AdUpsert, recommender: RecommenderDep
) -> AdAccepted:
    """Create or replace an ad; it becomes recommendable from its text alone."""
    await recommender.upsert_ad(Ad(ad_id=ad_id, text=body.text, bid=body.bid, category=body.category,
                                   active=body.active, ts=time.time()))
    return AdAccepted(ad_id=ad_id)
