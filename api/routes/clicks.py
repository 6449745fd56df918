"""POST /clicks."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from privads.api.deps import KEY_RESPONSES, RecommenderDep, Text, WriteAccess

router = APIRouter(tags=["clicks"])


class ClickRequest(BaseModel):
    impression_id: Text = Field(min_length=1, max_length=256, strict=True,
                               description="the impression_id that POST /recommend returned with this ad")
    user_id: Text = Field(min_length=1, max_length=128, strict=True)
    ad_id: Text = Field(min_length=1, max_length=256, strict=True)
    value: float | None = Field(None, ge=0, allow_inf_nan=False, description="revenue or conversion value")


class ClickAccepted(BaseModel):
    event_id: str


@router.post("/clicks", status_code=status.HTTP_202_ACCEPTED, response_model=ClickAccepted, dependencies=[WriteAccess],
             responses={**KEY_RESPONSES, 403: {"description": "impression_id was not served to this user_id and "
                                                              "ad_id (made up, another user's or another ad's)"}})
async def report_click(body: ClickRequest, recommender: RecommenderDep) -> ClickAccepted:
    """Report a click on an impression served to this user and ad; answered once privads.clicks has it."""
    return ClickAccepted(event_id=await recommender.report_click(body.impression_id, body.user_id, body.ad_id,
                                                                 body.value))
