"""Running the app under uvicorn: one process, or several on one port.

Several processes each bind their own ``SO_REUSEPORT`` socket, so the kernel
spreads connections across them by hash. With uvicorn's ``--workers`` they
share one listening socket instead, and the first process to wake accepts a
whole burst of keep-alive connections (measured: all four connections of a
load generator on one of two workers, the other idle). Its socket is also made
without ``IPPROTO_TCP``, so asyncio never sets ``TCP_NODELAY`` and every
keep-alive answer waited 40 ms for a delayed ACK.
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import time
from types import FrameType

import uvicorn

from privads.infra.errors import InvalidInput
from privads.infra.settings import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds loopback only: ``localhost``, 127.0.0.0/8 or ::1 (also IPv4-mapped)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # another name: it may resolve to any interface
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_bind(host: str, settings: Settings) -> None:
    """Refuse to serve beyond loopback without ``PRIVADS_API_KEY`` (README: Privacy and security).

    Raises
    ------
    InvalidInput
        With one line naming the address and what to do.
    """
    if settings.api_key is None and not is_loopback(host):
        raise InvalidInput(f"refusing to listen on {host} without PRIVADS_API_KEY: anyone who reaches it could log "
                           "impressions, report clicks and erase users; set PRIVADS_API_KEY (clients send it in "
                           "X-API-Key) or bind to 127.0.0.1")


def tcp_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket (``IPPROTO_TCP``, so accepted connections get ``TCP_NODELAY``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _config(factory: str, host: str, port: int) -> uvicorn.Config:
    # no access log and no X-Forwarded-* rewriting: the API binds to loopback or sits behind a proxy that logs
    return uvicorn.Config(factory, factory=True, host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=5, access_log=False, proxy_headers=False)


def _worker(factory: str, host: str, port: int, env: dict[str, str]) -> None:
    """One API process: its own socket in the port's reuse group, its own app built from ``env``."""
    os.environ.update(env)  # a spawned child: this is how the settings reach Settings() in the factory
    uvicorn.Server(_config(factory, host, port)).run(sockets=[tcp_listener(host, port, reuse_port=True)])


def serve(settings: Settings, host: str, port: int, factory: str = "privads.api.main:create_app") -> None:
    """Serve ``factory`` (an app factory's import path) with ``settings.api_workers`` processes, until stopped.

    A worker that dies is restarted; SIGTERM or SIGINT stops them all (each
    finishes its requests in flight). A non-loopback ``host`` needs an API key (``check_bind``).
    """
    check_bind(host, settings)
    if settings.api_workers == 1:
        module, name = factory.split(":")
        app = getattr(__import__(module, fromlist=[name]), name)(settings)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, access_log=False,
                    proxy_headers=False)
        return
    probe = tcp_listener(host, port, reuse_port=True)  # fail here, with the address, if the port is taken
    ctx = multiprocessing.get_context("spawn")
    env = settings.child_env()
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_worker, args=(factory, host, port, env), daemon=False)
        p.start()
        return p

    def stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = [start() for _ in range(settings.api_workers)]
    probe.close()
    try:
        while not stopping:
            for i, p in enumerate(workers):
                if not p.is_alive() and not stopping:
                    log.warning("API worker %d exited (%s); restarting it", p.pid, p.exitcode)
                    workers[i] = start()
            time.sleep(0.2)
    finally:
        for p in workers:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.stop_timeout_s
        for p in workers:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        for s, h in previous.items():
            signal.signal(s, h)
