"""GET /lift."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import RecommenderDep

router = APIRouter(tags=["experiment"])


class ArmOut(BaseModel):
    impressions: int
    clicks: int
    ctr: float
    ci95: tuple[float, float]


class LiftOut(BaseModel):
    window: float
    arms: dict[str, ArmOut]
    lift: float | None
    lift_ci95: tuple[float, float] | None
    p_value: float | None


@router.get("/lift", response_model=LiftOut)
async def lift(
    recommender: RecommenderDep,
    window: Annotated[float, Query(gt=0, le=30 * 86400, allow_inf_nan=False, description="seconds")] = 3600.0,
) -> LiftOut:
    """Online CTR per arm and the treatment's lift over control."""
    rep = await recommender.lift(window)
    return LiftOut(window=rep.window_s, lift=rep.lift, lift_ci95=rep.lift_ci95, p_value=rep.p_value,
                   arms={a: ArmOut(impressions=s.impressions, clicks=s.clicks, ctr=s.ctr, ci95=s.ci95)
                         for a, s in rep.arms.items()})
