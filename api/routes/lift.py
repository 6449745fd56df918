"""GET /lift."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from privads.api.deps import RecommenderDep
from privads.infra import keys

router = APIRouter(tags=["experiment"])

# the counters are rolled up per minute, hour and day, so a window of any length costs a bounded number of Redis
# reads (``keys.arm_cover``, ``Counters.arm_series``); the cap is the daily roll-ups' life
MAX_WINDOW_S = keys.ARM_MAX_WINDOW_S
WINDOW_DOC = f"seconds, at most {MAX_WINDOW_S} (366 days)"


class ArmOut(BaseModel):
    impressions: int
    clicks: int
    ctr: float
    ci95: tuple[float, float]
    value: float = Field(description="the clicks' values (POST /clicks `value`), summed")
    value_per_impression: float = Field(description="value / impressions (an impression without a click: 0)")
    value_ci95: tuple[float, float] | None = Field(description="normal interval of value per impression")


class LiftOut(BaseModel):
    window: float
    arms: dict[str, ArmOut]
    lift: float | None
    lift_ci95: tuple[float, float] | None = Field(description="delta-method interval: valid for one look")
    p_value: float | None = Field(description="two-proportion z-test: valid for one look")
    lift_ci95_sequential: tuple[float, float] | None = Field(
        description="always-valid interval (mSPRT): stays valid however often it is looked at, for a window that "
                    "starts with the experiment")
    p_value_sequential: float | None = Field(description="always-valid p-value of no lift (mSPRT)")
    value_lift: float | None = Field(description="value per impression, treatment over control, minus 1 (None "
                                     "without value in both arms)")
    value_lift_ci95: tuple[float, float] | None = Field(description="delta-method interval: valid for one look")
    value_p_value: float | None = Field(description="Welch z-test of equal value per impression: one look")
    value_lift_ci95_sequential: tuple[float, float] | None = Field(description="always-valid interval (mSPRT)")
    value_p_value_sequential: float | None = Field(description="always-valid p-value of no value lift (mSPRT)")


@router.get("/lift", response_model=LiftOut)
async def lift(
    recommender: RecommenderDep,
    window: Annotated[float, Query(gt=0, le=MAX_WINDOW_S, allow_inf_nan=False, description=WINDOW_DOC)] = 3600.0,
) -> LiftOut:
    """Online CTR and value per impression per arm, and the treatment's lift over control in both."""
    rep = await recommender.lift(window)
    return LiftOut(window=rep.window_s, lift=rep.lift, lift_ci95=rep.lift_ci95, p_value=rep.p_value,
                   lift_ci95_sequential=rep.lift_ci95_sequential, p_value_sequential=rep.p_value_sequential,
                   value_lift=rep.value_lift, value_lift_ci95=rep.value_lift_ci95, value_p_value=rep.value_p_value,
                   value_lift_ci95_sequential=rep.value_lift_ci95_sequential,
                   value_p_value_sequential=rep.value_p_value_sequential,
                   arms={a: ArmOut(impressions=s.impressions, clicks=s.clicks, ctr=s.ctr, ci95=s.ci95, value=s.value,
                                   value_per_impression=s.value_per_impression, value_ci95=s.value_ci95)
                         for a, s in rep.arms.items()})


class ArmSeries(BaseModel):
    impressions: list[int]
    clicks: list[int]
    ctr: list[float | None]
    value: list[float]
    value_per_impression: list[float | None]


class LiftSeriesOut(BaseModel):
    window: float
    bucket_s: float
    starts: list[float] = Field(description="each bucket's start, Unix seconds, oldest first")
    arms: dict[str, ArmSeries]
    lift: list[float | None] = Field(description="cumulative lift from the window's start to each bucket's end")
    lift_ci95: list[tuple[float, float] | None]
    lift_ci95_sequential: list[tuple[float, float] | None]
    value_lift: list[float | None] = Field(description="cumulative value-per-impression lift, as `lift`")
    value_lift_ci95: list[tuple[float, float] | None]
    value_lift_ci95_sequential: list[tuple[float, float] | None]


@router.get("/lift/series", response_model=LiftSeriesOut)
async def lift_series(
    recommender: RecommenderDep,
    window: Annotated[float, Query(gt=0, le=MAX_WINDOW_S, allow_inf_nan=False, description=WINDOW_DOC)] = 3600.0,
) -> LiftSeriesOut:
    """CTR of each arm per bucket and the cumulative lift with its intervals (what the dashboard draws).

    Buckets are minutes for windows up to 12 hours, hours up to 30 days, days beyond."""
    return LiftSeriesOut(**await recommender.lift_series(window))
