"""Dependencies injected into routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

from privads.api.metrics import ApiMetrics
from privads.infra.settings import Settings
from privads.ranker.service import Recommender

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="needed by the write endpoints when PRIVADS_API_KEY is set")


# async: FastAPI runs a plain ``def`` dependency in a thread pool, two thread hops per request for a lookup
async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(_api_key)] = None) -> None:
    """Write endpoints: when ``PRIVADS_API_KEY`` is set, the ``X-API-Key`` header must carry it."""
    if settings.api_key is None:
        return
    want = settings.api_key.get_secret_value().encode()
    if key is None or not secrets.compare_digest(key.encode(), want):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail=f"{API_KEY_HEADER}: missing or wrong API key for a write endpoint",
                            headers={"WWW-Authenticate": API_KEY_HEADER})


WriteAccess = Depends(require_api_key)
