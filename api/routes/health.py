"""GET /healthz (alive), GET /readyz (ready to serve) and GET /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from privads.api.deps import RecommenderDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(recommender: RecommenderDep) -> dict[str, object]:
    """Liveness (the process answers), and which model version is served; says nothing of readiness."""
    info = recommender.model_info()
    return {"status": "ok", "model_version": info["version"], "ads": info["index"]["size"]}


@router.get("/readyz", responses={503: {"description": "not ready yet: `reason` names what is missing"}})
async def readyz(recommender: RecommenderDep) -> Any:
    """Readiness: 200 once a model version is served and the catalog is loaded; 503 with the reason until then.

    A version ``model:current`` names that cannot be read does not make a serving API
    unready: the last good version is served and the bad one reported in ``skipped``.
    ``memory_pressure`` names a Redis near its memory ceiling (or one that evicts): reads
    still serve, so it is reported without going unready.
    """
    ready, body = recommender.readiness()
    body["memory_pressure"] = await recommender.memory_pressure()  # reported, not a reason to stop serving
    if ready:
        return {"status": "ready", **body}
    return JSONResponse(status_code=503, content={"status": "not ready", **body}, headers={"Retry-After": "1"})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, recommender: RecommenderDep) -> Response:
    """Prometheus text metrics."""
    m = request.app.state.metrics
    await request.app.state.refresh_metrics()
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
