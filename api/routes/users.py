"""DELETE /users/{user_id}, and GET /users/{user_id}/explain: why these ads (read-only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from pydantic import BaseModel, Field

from privads.api.deps import KEY_RESPONSES, RecommenderDep, WriteAccess

router = APIRouter(tags=["users"])


# ``:path``: an id may hold "/" (``/recommend`` accepts any 1-128 characters), sent percent-encoded as %2F, which the
# server decodes before routing; without it such a user could never be erased
@router.delete("/users/{user_id:path}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               dependencies=[WriteAccess],
               responses={**KEY_RESPONSES, 503: {"description": "Redis is unreachable, or full (at its maxmemory it "
                                                 "refuses writes): nothing was erased; retry after Retry-After"}})
async def erase_user(
    user_id: Annotated[str, Path(min_length=1, max_length=128)], recommender: RecommenderDep
) -> Response:
    """Erase every learned trace of a user."""
    await recommender.erase_user(user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class AdParts(BaseModel):
    ad_id: str
    position: int
    score: float = Field(description="the expected value the ad was ranked by, under the served draw")
    propensity: float = Field(description="how often the policy shows this ad at this position")
    bid: float
    retrieval_score: float | None = Field(None, description="its index key against the user's mean "
                                          "(u·p + log(bid · factor)): what made it a candidate")
    logit: float | None = Field(None, description="the ranker's h(x) (the global bias without a ranker)")
    dot_scale: float | None = Field(None, description="the ranker's weight on u·p (1 without a ranker)")
    user_dot: float | None = Field(None, description="u·p for the user's vector drawn for this request")
    user_dot_mean: float | None = Field(None, description="u·p at the user's posterior mean")
    factor: float | None = Field(None, description="the ad's calibration factor drawn for this request")
    factor_mean: float | None = Field(None, description="its posterior mean")
    pctr_mean: float | None = Field(None, description="σ(dot_scale · u·p + logit) at the mean, before calibration")


class ExplainOut(BaseModel):
    user_id: str
    arm: str
    policy: str = Field(description="thompson (the learned arm), popularity, random or pinned")
    model_version: str | None
    user_count: int = Field(description="labelled impressions the user's state has learned from (0: new user, "
                            "starting from the population prior)")
    logged: bool = Field(description="always false: nothing is logged, no impression exists")
    formula: str | None = None
    ads: list[AdParts]


@router.get("/users/{user_id:path}/explain", response_model=ExplainOut, dependencies=[WriteAccess],
            responses=KEY_RESPONSES)
async def explain(
    user_id: Annotated[str, Path(min_length=1, max_length=128)], recommender: RecommenderDep,
    k: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ExplainOut:
    """Why these ads: what /recommend would serve the user now, each score broken into its parts.

    Read-only: no impression is logged and nothing is learned. It shows what one user's state says, so when the
    API has a key it needs it, like the endpoints that change state.
    """
    return ExplainOut(**await recommender.explain(user_id, k, None))
