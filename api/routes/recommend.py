"""POST /recommend."""

from __future__ import annotations

import math
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Response
from pydantic import AfterValidator, BaseModel, Field

from privads.api.deps import KEY_RESPONSES, MetricsDep, RecommenderDep, Text, WriteAccess

router = APIRouter(tags=["recommend"])

# context is copied into every impression it asks for (k of them), and on into Kafka, Redis and the archive: these
# bound what one request can make the system carry (about 2 KiB × k), whatever a client sends
MAX_CONTEXT_KEYS = 32
MAX_CONTEXT_KEY_CHARS = 64
MAX_CONTEXT_VALUE_CHARS = 256
MAX_CONTEXT_BYTES = 2048  # the whole context, as JSON
_INT_BOUND = 2**63  # what every reader of the logs (Parquet, numpy) can hold


def bounded_context(context: dict[str, Any]) -> dict[str, Any]:
    """``context`` if within the limits, with scalar values only; else a ``ValueError`` naming the limit.

    The ranker reads strings, integers and booleans (``ranker.features.context_ids``); floats and nulls
    are allowed and ignored by it; lists and objects are refused: they could only carry bulk.
    """
    for key, value in context.items():
        if isinstance(value, str):
            if len(value) > MAX_CONTEXT_VALUE_CHARS:
                raise ValueError(f"context[{key!r}]: a value is at most {MAX_CONTEXT_VALUE_CHARS} characters "
                                 f"(this one has {len(value)})")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not -_INT_BOUND <= value < _INT_BOUND:
                raise ValueError(f"context[{key!r}]: an integer must fit in 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"context[{key!r}]: a number must be finite")
        else:
            raise ValueError(f"context[{key!r}]: values are strings, numbers, booleans or null, not "
                             f"{'an array' if isinstance(value, list) else 'an object'}")
    try:
        size = len(orjson.dumps(context))
    except orjson.JSONEncodeError:  # a lone surrogate: JSON in, but no UTF-8 out to Kafka
        raise ValueError("context: strings must be valid Unicode (a lone surrogate?)") from None
    if size > MAX_CONTEXT_BYTES:
        raise ValueError(f"context: at most {MAX_CONTEXT_BYTES} bytes as JSON (this one has {size})")
    return context


class RecommendRequest(BaseModel):
    user_id: Text = Field(min_length=1, max_length=128, strict=True, description="pseudonymous user id")
    k: int = Field(10, ge=1, le=100, strict=True, description="number of ads (at most 100)")
    context: Annotated[dict[Annotated[str, Field(max_length=MAX_CONTEXT_KEY_CHARS)], Any],
                       AfterValidator(bounded_context)] = Field(
        default_factory=dict, max_length=MAX_CONTEXT_KEYS,
        description=f"request context, e.g. {{\"device\": \"mobile\"}}; at most {MAX_CONTEXT_KEYS} keys of at "
                    f"most {MAX_CONTEXT_KEY_CHARS} characters, values strings of at most {MAX_CONTEXT_VALUE_CHARS} "
                    f"characters, numbers, booleans or null, {MAX_CONTEXT_BYTES} bytes in all as JSON; scalar values "
                    "become ranker features")


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


@router.post("/recommend", response_model=RecommendResponse, dependencies=[WriteAccess], responses=KEY_RESPONSES)
async def recommend(body: RecommendRequest, recommender: RecommenderDep, metrics: MetricsDep) -> Response:
    """Top-k ads for a user; one impression per returned ad is logged to Kafka (so it needs the key, if one is set).

    Each ``impression_id`` is signed for this user and ad: ``POST /clicks`` takes it back only with both.
    """
    rec = await recommender.recommend(body.user_id, body.k, body.context)
    metrics.recommendations.labels(policy=rec.policy).inc()
    metrics.recommended_ads.labels(policy=rec.policy).inc(len(rec.ads))
    # serialised directly (the shape is RecommendResponse's, checked by the tests): the hot path skips re-validation
    return Response(orjson.dumps({
        "request_id": rec.request_id, "policy": rec.policy, "model_version": rec.model_version,
        "ads": [{"ad_id": a.ad_id, "position": a.position, "score": a.score, "propensity": a.propensity,
                 "impression_id": a.impression_id} for a in rec.ads]}), media_type="application/json")
