"""GET /healthz and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from privads.api.deps import RecommenderDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(recommender: RecommenderDep) -> dict[str, object]:
    """Liveness, and which model version is served."""
    info = recommender.model_info()
    return {"status": "ok", "model_version": info["version"], "ads": info["index"]["size"]}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, recommender: RecommenderDep) -> Response:
    """Prometheus text metrics."""
    m = request.app.state.metrics
    await request.app.state.refresh_metrics()
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
