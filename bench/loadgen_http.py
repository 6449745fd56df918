"""Lean closed-loop HTTP/1.1 load generator, run as its own process by ``privads bench serve``.

The bench machine has two cores shared by the server under test and this client,
so every microsecond the client spends per request is taken from the server.
General-purpose clients (httpx, aiohttp) cost several times the server's own
work per request; this one keeps the hot path to a few syscalls:

* every request is encoded to bytes once, before the run;
* each of ``concurrency`` keep-alive connections is an ``asyncio.Protocol`` that
  frames the response itself (status line, Content-Length or chunked, or read
  until close), so a response costs one callback and one future;
* timeouts are enforced by one watchdog task scanning the connections a few
  times a second, not by a timer per request.

The run is closed-loop: a connection sends its next request only once the
previous answer is fully read. An optional ``rate`` caps the total request rate.
Run it as ``python -m infra.loadgen_http --host H --port P --requests FILE.jsonl
--concurrency C --duration S``; it prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn, cast

import numpy as np

from privads.infra.errors import HttpProtocolError

# Parser states of a connection while it reads one response.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(7)

# A response head or chunk-size line longer than this is not a server we can measure.
_MAX_LINE = 64 * 1024

# Pause after a failed connect, so a dead server yields errors, not a busy loop.
_CONNECT_BACKOFF_S = 0.05

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured.

    Attributes
    ----------
    requests : int
        Responses (any status) completed during the measured phase.
    errors : int
        Non-2xx responses plus connection errors and timeouts in the measured phase.
    statuses : dict[int, int]
        Status code -> number of responses in the measured phase.
    duration_s : float
        Wall time of the measured phase.
    qps : float
        ``requests / duration_s``.
    p50_ms, p90_ms, p99_ms, max_ms : float
        Latency of the responses counted in ``requests``, from before the request
        was written to after the last body byte was read; 0.0 when there were none.
    concurrency : int
        Number of keep-alive connections.
    """

    requests: int
    errors: int
    statuses: dict[int, int]
    duration_s: float
    qps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    concurrency: int

    def to_dict(self) -> dict[str, object]:
        """The result as plain JSON types.

        Returns
        -------
        dict
            All fields; ``statuses`` keys are strings, so the dict survives a JSON round trip unchanged.
        """
        out = asdict(self)
        out["statuses"] = {str(code): n for code, n in sorted(self.statuses.items())}
        return out


def encode_request(host: str, port: int, method: str, path: str, body: bytes | None) -> bytes:
    """The complete bytes of one HTTP/1.1 request.

    Parameters
    ----------
    host, port : str, int
        Target, used for the ``Host`` header.
    method : str
        HTTP method, e.g. ``"POST"``.
    path : str
        Request target starting with ``/``; ASCII only.
    body : bytes or None
        JSON body sent with ``Content-Type: application/json``; None sends no body.

    Returns
    -------
    bytes
        Request line, headers and body, ready to write on a keep-alive connection.
    """
    if not method or not method.isascii() or not method.isalpha():
        raise ValueError(f"bad HTTP method {method!r}")
    if not path.startswith("/") or not path.isascii() or any(c in path for c in " \r\n"):
        raise ValueError(f"bad request path {path!r}: must start with / and be ASCII without spaces")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"{method.upper()} {path} HTTP/1.1\r\nHost: {authority}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode("ascii") + body
    if method.upper() not in _BODYLESS_METHODS:
        # Servers may wait for a body on POST/PUT without a length, or answer 411.
        head += "Content-Length: 0\r\n"
    return (head + "\r\n").encode("ascii")


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends a request and frames the one response to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._head_request = False
        self._state = _HEAD
        self._status = 0
        self._remaining = 0
        self.sent_at = 0.0
        self.keep_alive = True
        self.lost = False
        self.timed_out = False

    @property
    def usable(self) -> bool:
        """True while another request may be sent on this connection."""
        return self.keep_alive and not self.lost

    @property
    def waiting(self) -> bool:
        """True while a response is outstanding."""
        return self._waiter is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        # create_connection's transports are stream Transports; the Protocol API types them as any transport
        self._transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, head_request: bool, now: float) -> asyncio.Future[int]:
        """Write one request; the future resolves to the status once the whole response is read."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._head_request = head_request
        self._state = _HEAD
        self.sent_at = now
        assert self._transport is not None  # create_connection hands the protocol out after connection_made
        self._transport.write(data)
        return waiter

    def abort(self, timed_out: bool = False) -> None:
        """Drop the connection now; an outstanding request fails (with TimeoutError if ``timed_out``)."""
        self.timed_out = self.timed_out or timed_out
        self.keep_alive = False
        if self._transport is not None and not self.lost:
            self._transport.abort()

    def close(self) -> None:
        """Close an idle connection."""
        self.keep_alive = False
        if self._transport is not None and not self.lost:
            self._transport.close()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buf = self._buf
        buf += data
        if self._waiter is None:
            self._fail(HttpProtocolError("server sent bytes while no request was outstanding"))
            return
        try:
            done = self._parse()
        except (HttpProtocolError, ValueError) as e:
            self._fail(e if isinstance(e, HttpProtocolError) else HttpProtocolError(str(e)))
            return
        if done:
            if buf:
                # Bytes beyond the response cannot belong to a request we sent: never reuse.
                self.keep_alive = False
                buf.clear()
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(self._status)

    def eof_received(self) -> bool | None:  # noqa: D102
        # Returning None closes the transport; connection_lost then settles the waiter.
        return None

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self.lost = True
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if self._state == _UNTIL_CLOSE and not self.timed_out:
            waiter.set_result(self._status)
        elif self.timed_out:
            waiter.set_exception(TimeoutError("no complete response within the timeout"))
        else:
            waiter.set_exception(exc or ConnectionResetError("server closed the connection mid-response"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def _parse(self) -> bool:
        """Consume buffered bytes; True once the current response is complete."""
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_LINE:
                        raise HttpProtocolError("response head too large")
                    return False
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._read_head(head):
                    return True
            elif state == _LENGTH or state == _CHUNK_DATA:
                # Consume bodies as they arrive so large responses never accumulate.
                n = len(buf)
                if n < self._remaining:
                    self._remaining -= n
                    buf.clear()
                    return False
                del buf[: self._remaining]
                if state == _LENGTH:
                    return True
                self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_LINE:
                        raise HttpProtocolError("chunk size line too long")
                    return False
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                del buf[: end + 2]
                if size < 0:
                    raise HttpProtocolError("negative chunk size")
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    raise HttpProtocolError("chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_LINE:
                        raise HttpProtocolError("trailer line too long")
                    return False
                del buf[: end + 2]
                if end == 0:
                    return True
            else:  # _UNTIL_CLOSE: the body ends when the server closes; connection_lost completes it
                buf.clear()
                return False

    def _read_head(self, head: bytes) -> bool:
        """Take the status and framing from a response head; True if the response has no body."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12 or status_line[12:13] not in (b"", b" "):
            raise HttpProtocolError(f"bad status line {status_line[:80]!r}")
        status = int(status_line[9:12])
        close = status_line[7:8] == b"0"  # HTTP/1.0 closes unless it says keep-alive
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
                if length < 0:
                    raise HttpProtocolError("negative Content-Length")
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens:
                    close = False
        if 100 <= status < 200:
            if status == 101:
                raise HttpProtocolError("server switched protocols")
            return False  # an interim answer (100 Continue): the real head follows
        self._status = status
        if close:
            self.keep_alive = False
        if self._head_request or status == 204 or status == 304:
            return True
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length == 0:
                return True
            self._remaining = length
            self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        return False


class _Run:
    """State of one load run: the connections' workers, the watchdog and the counters."""

    def __init__(self, host: str, port: int, requests: Sequence[tuple[str, str, bytes | None]], concurrency: int,
                 duration_s: float, warmup_s: float, timeout_s: float, rate: float | None,
                 connections: int | None = None) -> None:
        if not requests:
            raise ValueError("requests must not be empty")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if duration_s <= 0 or warmup_s < 0 or timeout_s <= 0:
            raise ValueError("duration_s and timeout_s must be > 0 and warmup_s >= 0")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 when given")
        self.host = host
        self.port = port
        self.pool = [(encode_request(host, port, m, p, b), m.upper() == "HEAD") for m, p, b in requests]
        self.concurrency = concurrency
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.timeout_s = timeout_s
        self.interval = 1.0 / rate if rate else 0.0
        # each in-flight slot rotates over its own keep-alive connections: with several server processes
        # behind one port (SO_REUSEPORT hashes connections), more connections than slots spread the load
        # the way many clients do, where one connection per slot can land every slot on one process
        self.per_slot = max(1, (connections or concurrency) // concurrency)
        self.conns: list[_Connection | None] = [None] * (concurrency * self.per_slot)
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.last_error: str | None = None
        self.cpu_s = 0.0
        self.measure_start = 0.0
        self.end = 0.0
        self.next_slot = 0.0
        self.stopping = False

    async def run(self) -> LoadResult:
        perf = time.perf_counter
        start = perf()
        self.measure_start = start + self.warmup_s
        self.end = self.measure_start + self.duration_s
        self.next_slot = start
        workers = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]
        watchdog = asyncio.create_task(self._watchdog())
        try:
            if self.warmup_s:
                await asyncio.wait(workers, timeout=self.warmup_s)
            cpu0 = _cpu_seconds()
            await asyncio.wait(workers, timeout=max(0.0, self.end - perf()))
            self.cpu_s = _cpu_seconds() - cpu0
            # Requests in flight now would complete after the window and not count: drop them, don't wait.
            # The loop's timer may fire a little before ``end`` (uvloop rounds to whole ms), so the failures
            # our own aborts cause are not the server's errors.
            self.stopping = True
            for conn in self.conns:
                if conn is not None:
                    conn.abort()
            _, pending = await asyncio.wait(workers, timeout=self.timeout_s + 1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            for conn in self.conns:
                if conn is not None:
                    conn.abort()
        for task in workers:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        return self._result()

    async def _worker(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        perf = time.perf_counter
        pool = self.pool
        n = len(pool)
        step = self.concurrency % n or n  # offset i, then every concurrency-th entry, mod the pool size
        idx = i % n
        end = self.end
        m = self.per_slot
        mine: list[_Connection | None] = [None] * m
        j = 0
        while True:
            j = (j + 1) % m
            conn = mine[j]
            now = perf()
            if now >= end:
                break
            if self.interval:
                slot = max(self.next_slot, now)  # a cap: time lost while behind is not made up in a burst
                self.next_slot = slot + self.interval
                if slot > now:
                    await asyncio.sleep(min(slot, end) - now)
                    if perf() >= end:
                        break
            if conn is None or not conn.usable:
                if conn is not None:
                    conn.close()
                conn = mine[j] = None
                self.conns[i * m + j] = None
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: _Connection(loop), self.host, self.port),
                        timeout=min(self.timeout_s, max(0.001, end - perf())))
                except (OSError, TimeoutError) as e:
                    self._error(perf(), e)
                    await asyncio.sleep(min(_CONNECT_BACKOFF_S, max(0.0, end - perf())))
                    continue
                conn = mine[j] = proto
                self.conns[i * m + j] = conn
            data, head_request = pool[idx]
            idx += step
            if idx >= n:
                idx -= n
            t0 = perf()
            try:
                status = await conn.send(data, head_request, t0)
            except (OSError, TimeoutError) as e:
                self._error(perf(), e)
                continue
            t1 = perf()
            if self.measure_start <= t1 < end:
                self.latencies.append(t1 - t0)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if not 200 <= status < 300:
                    self.errors += 1

    async def _watchdog(self) -> None:
        period = min(0.1, self.timeout_s / 4)
        perf = time.perf_counter
        while True:
            await asyncio.sleep(period)
            now = perf()
            for conn in self.conns:
                if conn is not None and conn.waiting and now - conn.sent_at > self.timeout_s:
                    conn.abort(timed_out=True)

    def _error(self, at: float, exc: BaseException) -> None:
        if self.stopping:
            return
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.measure_start <= at < self.end:
            self.errors += 1

    def _result(self) -> LoadResult:
        count = len(self.latencies)
        if count:
            lat_ms = np.asarray(self.latencies, dtype=np.float64) * 1000.0
            p50, p90, p99 = (float(v) for v in np.percentile(lat_ms, [50, 90, 99]))
            worst = float(lat_ms.max())
        else:
            p50 = p90 = p99 = worst = 0.0
        return LoadResult(requests=count, errors=self.errors, statuses=dict(sorted(self.statuses.items())),
                          duration_s=self.duration_s, qps=count / self.duration_s, p50_ms=p50, p90_ms=p90,
                          p99_ms=p99, max_ms=worst, concurrency=self.concurrency)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(host: str, port: int, requests: Sequence[tuple[str, str, bytes | None]], *, concurrency: int,
                   duration_s: float, warmup_s: float = 2.0, timeout_s: float = 5.0,
                   rate: float | None = None, connections: int | None = None) -> LoadResult:
    """Load ``host:port`` with ``concurrency`` closed-loop keep-alive connections.

    Parameters
    ----------
    host, port : str, int
        The HTTP/1.1 server.
    requests : sequence of (method, path, body)
        Pool of prepared requests; ``body`` is JSON bytes or None. Connection ``i``
        starts at entry ``i`` and steps by ``concurrency``, so concurrent connections
        send different requests and together cover the pool.
    concurrency : int
        Number of persistent connections, each with one request outstanding.
    duration_s : float
        Length of the measured phase.
    warmup_s : float
        Unrecorded load before the measured phase (connections, caches, JIT warm up).
    timeout_s : float
        A request (or connect) taking longer is an error and its connection is re-opened.
    rate : float, optional
        Cap on total requests/s across connections; without it each connection
        sends as fast as answers come back.
    connections : int, optional
        Keep-alive connections in all (default ``concurrency``); each in-flight
        slot rotates over ``connections // concurrency`` of them.

    Returns
    -------
    LoadResult
        Counts and latency percentiles of the measured phase. The run ends at
        ``warmup_s + duration_s`` plus at most ``timeout_s + 1`` s, whatever the server does.
    """
    return await _Run(host, port, requests, concurrency, duration_s, warmup_s, timeout_s, rate, connections).run()


def write_requests(path: Path, requests: Iterable[tuple[str, str, object]]) -> None:
    """Write a request pool as JSONL for the CLI.

    Parameters
    ----------
    path : Path
        Output file, one ``{"method", "path", "body"}`` object per line.
    requests : iterable of (method, path, body)
        ``body`` is any JSON-serialisable object, JSON bytes, or None for no body.
    """
    with Path(path).open("w", encoding="utf-8") as f:
        for method, target, body in requests:
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            f.write(json.dumps({"method": method, "path": target, "body": body}, separators=(",", ":")) + "\n")


def read_requests(path: Path) -> list[tuple[str, str, bytes | None]]:
    """Read a JSONL request pool written by :func:`write_requests`.

    Parameters
    ----------
    path : Path
        JSONL file; ``body`` may be missing or null for no body.

    Returns
    -------
    list of (method, path, body)
        Bodies re-encoded as compact JSON bytes, ready for :func:`run_load`.
    """
    pool: list[tuple[str, str, bytes | None]] = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                method, target = item["method"], item["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a request object ({e})") from None
            body = item.get("body")
            pool.append((method, target, None if body is None else json.dumps(body, separators=(",", ":")).encode()))
    if not pool:
        raise ValueError(f"{path}: no requests")
    return pool


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # The caller reads one line of stderr as the reason; argparse would print the usage too.
        self.exit(2, f"loadgen_http: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run one load and print its result as one JSON object.

    The object is :meth:`LoadResult.to_dict` plus ``client_cpu_s`` and
    ``client_cpu_ms_per_request``: this process's CPU time during the measured
    phase, total and per completed request.

    Returns
    -------
    int
        0 on success; non-zero, with a one-line reason on stderr, when the
        arguments or request file are bad or no response arrived in the measured phase.
    """
    parser = _ArgumentParser(prog="python -m infra.loadgen_http", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=Path, required=True, help="JSONL of {method, path, body}")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, required=True, help="measured phase (s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded warm-up (s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (s)")
    parser.add_argument("--rate", type=float, default=None, help="cap on total requests/s")
    parser.add_argument("--connections", type=int, default=None, help="keep-alive connections (≥ concurrency)")
    args = parser.parse_args(argv)
    try:
        pool = read_requests(args.requests)
        run = _Run(args.host, args.port, pool, args.concurrency, args.duration, args.warmup, args.timeout, args.rate,
                   args.connections)
        result = _run_in_loop(run)
    except (OSError, ValueError) as e:
        print(f"loadgen_http: {e}", file=sys.stderr)
        return 2
    if result.requests == 0:
        print(f"loadgen_http: no responses from {args.host}:{args.port} in the measured phase "
              f"({result.errors} errors; last: {run.last_error})", file=sys.stderr)
        return 1
    out = result.to_dict()
    out["client_cpu_s"] = run.cpu_s
    out["client_cpu_ms_per_request"] = run.cpu_s * 1000.0 / result.requests
    out["connections"] = len(run.conns)
    print(json.dumps(out))
    return 0


def _run_in_loop(run: _Run) -> LoadResult:
    try:
        import uvloop  # optional: a cheaper event loop when installed, never a dependency
    except ImportError:
        return asyncio.run(run.run())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run.run())


if __name__ == "__main__":
    sys.exit(main())
