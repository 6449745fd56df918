"""GET /dashboard: one static page (no build step) that polls /lift and /lift/series and draws them."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["experiment"])
PAGE = resources.files("privads.api").joinpath("static", "dashboard.html").read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """Live charts of CTR per arm over time and the lift with its intervals."""
    return HTMLResponse(PAGE)
