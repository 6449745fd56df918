"""POST /clicks."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from privads.api.deps import RecommenderDep, WriteAccess

router = APIRouter(tags=["clicks"])


class ClickRequest(BaseModel):
    impression_id: str = Field(min_length=1, max_length=256, strict=True)
    user_id: str = Field(min_length=1, max_length=128, strict=True)
    ad_id: str = Field(min_length=1, max_length=256, strict=True)
    value: float | None = Field(None, ge=0, allow_inf_nan=False, description="revenue or conversion value")


class ClickAccepted(BaseModel):
    event_id: str


@router.post("/clicks", status_code=status.HTTP_202_ACCEPTED, response_model=ClickAccepted, dependencies=[WriteAccess],
             responses={401: {"description": "PRIVADS_API_KEY is set and X-API-Key does not match"}})
async def report_click(body: ClickRequest, recommender: RecommenderDep) -> ClickAccepted:
    """Report a click; it is produced to privads.clicks."""
    return ClickAccepted(event_id=recommender.report_click(body.impression_id, body.user_id, body.ad_id, body.value))
