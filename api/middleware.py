"""ASGI middleware: per-route latency, a request deadline and a body-size limit, in one pass.

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

DEFAULT_MAX_BODY_BYTES = 64 * 1024


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, if it declares a valid one."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ObserveAndLimit:
    """Record each request's latency by route and status; answer 503 if it outlives ``timeout_s``, 413 if its
    body is larger than ``max_body_bytes``.

    The body is read here, before any route parses it, and handed on whole: a
    ``Content-Length`` above the limit is refused without reading a byte, and a
    body sent without one (chunked) is refused as soon as what has arrived
    exceeds it, so a client can never make the API hold more than the limit.

    Parameters
    ----------
    app : ASGI app
    metrics : ApiMetrics
    timeout_s : float
        A request still running by then is cancelled and answered 503.
    max_body_bytes : int
        The largest request body accepted.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, timeout_s: float,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """A ``receive`` that replays the whole body, read here; None if the body is over the limit."""
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app sees it as it would have
                first = message
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()  # after the body: a disconnect, when it comes

        return replay

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
                bounded = await self._read_body(scope, receive)
                if bounded is None:
                    status.append(413)
                    body: dict[str, Any] = {
                        "error": f"request body larger than the limit of {self.max_body_bytes} bytes "
                                 "(PRIVADS_MAX_BODY_BYTES)", "detail": "body_too_large", "limit": self.max_body_bytes}
                    # the rest of the body is not read: the connection cannot be reused for another request
                    await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
                    return
                await self.app(scope, bounded, send_observed)
        except TimeoutError:
            if not deadline.expired() or status:  # not our deadline, or too late to answer: a real error
                raise
            status.append(503)
            body = {"error": f"request timed out after {self.timeout_s:g} s", "detail": "timeout"}
            await JSONResponse(body, status_code=503)(scope, receive, send)
        finally:
            route = scope.get("route")
            self.metrics.latency.labels(scope["method"], getattr(route, "path", "unmatched"),
                                        str(status[0] if status else 500)).observe(time.perf_counter() - start)
