"""Dependencies injected into routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator

from privads.api.metrics import ApiMetrics
from privads.infra.settings import Settings
from privads.ranker.service import Recommender

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="needed by the state-changing endpoints when PRIVADS_API_KEY is set")


# async: FastAPI runs a plain ``def`` dependency in a thread pool, two thread hops per request for a lookup
async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def _unicode(value: str) -> str:
    # JSON may spell a lone surrogate ("\\ud800"), which the JSON parser accepts but no UTF-8 encoder writes out:
    # refused here (422) rather than failing when the event is encoded for Kafka (500)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""A body string that can be written to Kafka as UTF-8."""

RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


# the settings from the request rather than through SettingsDep: one dependency less to solve on every
# /recommend (about 13 µs each in FastAPI)
async def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key)] = None) -> None:
    """State-changing endpoints: when ``PRIVADS_API_KEY`` is set, the ``X-API-Key`` header must carry it.

    Those are the writes (``PUT /ads``, ``DELETE /users``, ``POST /clicks``) and
    ``POST /recommend``, which logs impressions: an open one would let anyone
    add negatives to a user's vector, and read that user's personalised ads.
    """
    settings: Settings = request.app.state.settings
    if settings.api_key is None:
        return
    want = settings.api_key.get_secret_value().encode()
    if key is None or not secrets.compare_digest(key.encode(), want):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail=f"{API_KEY_HEADER}: missing or wrong API key for a state-changing endpoint",
                            headers={"WWW-Authenticate": API_KEY_HEADER})


WriteAccess = Depends(require_api_key)
KEY_RESPONSES: dict[int | str, dict[str, str]] = {
    401: {"description": "PRIVADS_API_KEY is set and X-API-Key does not match"}}
