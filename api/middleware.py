"""ASGI middleware: per-route latency and a request deadline, in one pass.

Pure ASGI rather than ``@app.middleware("http")``: that wrapper copies every
response body through a memory stream and costs about as much as a whole
``/healthz``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privads.api.metrics import ApiMetrics


class ObserveAndLimit:
    """Record each request's latency by route and status; answer 503 if it outlives ``timeout_s``.

    Parameters
    ----------
    app : ASGI app
    metrics : ApiMetrics
    timeout_s : float
        A request still running by then is cancelled and answered 503.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, timeout_s: float) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                await self.app(scope, receive, send_observed)
        except TimeoutError:
            if not deadline.expired() or status:  # not our deadline, or too late to answer: a real error
                raise
            status.append(503)
            body: dict[str, Any] = {"error": f"request timed out after {self.timeout_s:g} s", "detail": "timeout"}
            await JSONResponse(body, status_code=503)(scope, receive, send)
        finally:
            route = scope.get("route")
            self.metrics.latency.labels(scope["method"], getattr(route, "path", "unmatched"),
                                        str(status[0] if status else 500)).observe(time.perf_counter() - start)
