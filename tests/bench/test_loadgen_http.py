"""The HTTP load generator against real servers: uvicorn/FastAPI, and a raw socket server for odd framing."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from privads.bench.loadgen_http import LoadResult, read_requests, run_load, write_requests
from privads.infra.processes import free_port

RESULT_KEYS = {"requests", "errors", "statuses", "duration_s", "qps", "p50_ms", "p90_ms", "p99_ms", "max_ms",
               "concurrency"}


def make_app(hits: Counter[int]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        data = await request.json()
        hits[data["id"]] += 1
        return JSONResponse({"id": data["id"]}, status_code=500 if data.get("fail") else 200)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"part {i};".encode() * 50

        return StreamingResponse(parts(), media_type="text/plain")

    @app.get("/ping")
    async def ping() -> JSONResponse:
        return JSONResponse({"ok": True})

    return app


@pytest.fixture(scope="module")
def api() -> Iterator[tuple[int, Counter[int]]]:
    """A real uvicorn server in a thread; yields its port and the per-body hit counter."""
    hits: Counter[int] = Counter()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(hits), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, hits
    server.should_exit = True
    thread.join(5)


def check_latencies(r: LoadResult) -> None:
    assert r.requests > 0 and r.qps > 0
    assert r.qps == pytest.approx(r.requests / r.duration_s)
    assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms


def test_post_pool_delivers_every_body_and_counts_500s(api: tuple[int, Counter[int]]) -> None:
    port, hits = api
    hits.clear()
    pool = [("POST", "/echo", json.dumps({"id": i, "fail": i == 5}).encode()) for i in range(6)]
    r = asyncio.run(run_load("127.0.0.1", port, pool, concurrency=3, duration_s=0.8, warmup_s=0.2))
    check_latencies(r)
    assert r.concurrency == 3 and r.duration_s == 0.8
    assert r.statuses[200] > 0 and r.statuses[500] > 0
    assert sum(r.statuses.values()) == r.requests
    assert r.errors == r.statuses[500]
    assert set(hits) == set(range(6)), "every body in the pool reached the server"
    assert sum(hits.values()) >= r.requests
    # Connection i cycles i, i+3: each body is sent about as often as the others.
    assert min(hits.values()) > 0.5 * max(hits.values())


def test_chunked_streaming_response_parses(api: tuple[int, Counter[int]]) -> None:
    port, _ = api
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/stream")
    resp = conn.getresponse()
    assert resp.getheader("transfer-encoding") == "chunked", "the endpoint must exercise chunked framing"
    resp.read()
    conn.close()
    r = asyncio.run(run_load("127.0.0.1", port, [("GET", "/stream", None)], concurrency=2, duration_s=0.5,
                             warmup_s=0.1))
    check_latencies(r)
    assert r.errors == 0 and r.statuses == {200: r.requests}


class RawHandler(socketserver.BaseRequestHandler):
    """Answers keep-alive requests with hand-framed responses, sent in fragments to split every boundary."""

    server: RawServer

    def handle(self) -> None:
        try:
            self.serve(self.request)
        except ConnectionError:
            pass  # the load generator resets its connections when a run ends

    def serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                buf += sock.recv(65536)
            buf = buf[length:]
            path = head.split(b" ")[1].decode()
            self.server.hits[path] += 1
            if path == "/hang":
                while sock.recv(65536):  # never answer; return once the client gives up
                    pass
                return
            for piece in RESPONSES[path]:
                sock.sendall(piece)
                time.sleep(0.002)
            if path in ("/close", "/eof"):
                return


RESPONSES = {
    # Chunk extension, a chunk split across sends, a trailer, and the terminator split from its CRLFs.
    "/fragmented": [b"HTTP/1.", b"1 200 OK\r\nTransfer-Encoding: chu", b"nked\r\nContent-Type: text/plain\r",
                    b"\n\r\n5;ext=1\r\nhel", b"lo\r\n6\r\n world\r", b"\n0\r\nX-Trailer: 1\r\n", b"\r\n"],
    "/close": [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\n", b"done"],
    "/eof": [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"body until ", b"close"],
    "/empty": [b"HTTP/1.1 204 No Content\r\n\r\n"],
}


class RawServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RawHandler)
        self.hits: Counter[str] = Counter()


@pytest.fixture(scope="module")
def raw() -> Iterator[RawServer]:
    server = RawServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/fragmented", "/close", "/eof", "/empty"])
def test_fragmented_and_connection_close_framing(raw: RawServer, path: str) -> None:
    r = asyncio.run(run_load("127.0.0.1", raw.server_address[1], [("GET", path, None)], concurrency=2,
                             duration_s=0.4, warmup_s=0.0, timeout_s=2.0))
    code = 204 if path == "/empty" else 200
    assert r.requests > 2 and r.errors == 0 and r.statuses == {code: r.requests}
    assert raw.hits[path] >= r.requests


def test_unresponsive_server_times_out_without_hanging(raw: RawServer) -> None:
    t0 = time.monotonic()
    r = asyncio.run(run_load("127.0.0.1", raw.server_address[1], [("GET", "/hang", None)], concurrency=2,
                             duration_s=0.7, warmup_s=0.0, timeout_s=0.2))
    assert time.monotonic() - t0 < 0.7 + 0.2 + 1.0
    assert r.requests == 0 and r.errors >= 2 and r.statuses == {}
    assert r.p50_ms == r.max_ms == 0.0


def test_refused_connections_are_errors() -> None:
    r = asyncio.run(run_load("127.0.0.1", free_port(), [("GET", "/", None)], concurrency=2, duration_s=0.3,
                             warmup_s=0.0, timeout_s=0.5))
    assert r.requests == 0 and r.errors > 0


def test_rate_caps_total_throughput(api: tuple[int, Counter[int]]) -> None:
    port, _ = api
    r = asyncio.run(run_load("127.0.0.1", port, [("GET", "/ping", None)], concurrency=4, duration_s=0.6,
                             warmup_s=0.1, rate=50))
    assert 15 <= r.qps <= 60


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        asyncio.run(run_load("127.0.0.1", 1, [], concurrency=1, duration_s=1))
    with pytest.raises(ValueError):
        asyncio.run(run_load("127.0.0.1", 1, [("GET", "no-slash", None)], concurrency=1, duration_s=1))


def test_cli_prints_one_json_object(api: tuple[int, Counter[int]], tmp_path: Path) -> None:
    port, _ = api
    pool = [("POST", "/echo", {"id": i}) for i in range(4)] + [("GET", "/ping", None)]
    file = tmp_path / "requests.jsonl"
    write_requests(file, pool)
    assert read_requests(file) == [("POST", "/echo", json.dumps({"id": i}, separators=(",", ":")).encode())
                                   for i in range(4)] + [("GET", "/ping", None)]
    proc = subprocess.run([sys.executable, "-m", "privads.bench.loadgen_http", "--port", str(port), "--requests",
                           str(file), "--concurrency", "4", "--duration", "0.6", "--warmup", "0.1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == RESULT_KEYS | {"client_cpu_s", "client_cpu_ms_per_request", "connections"}
    assert out["requests"] > 0 and out["errors"] == 0 and out["statuses"] == {"200": out["requests"]}
    assert out["client_cpu_ms_per_request"] > 0


def test_cli_failure_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "privads.bench.loadgen_http", "--port", "1", "--requests",
                           str(tmp_path / "missing.jsonl"), "--duration", "1"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing.jsonl" in proc.stderr
