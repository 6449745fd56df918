"""``privads up``: the whole stack in the foreground; Ctrl-C stops every process it started.

The stack is started in order (broker, Redis, workers, the sample catalog, the
learner's first version, the API), then supervised. The line that says it serves
(``READY_LINE``) is printed only once the API's ``/readyz`` answers 200: a model
version and the catalog loaded, so the first ``/recommend`` after it returns ads.
Until then the supervisor logs why the API is not ready (once per reason).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable

import httpx
import redis

from privads.api.server import check_bind
from privads.infra import keys
from privads.infra.kafka import create_topics
from privads.infra.migrate import holds_old_layout, migrate
from privads.infra.processes import (
    Process,
    StartError,
    broker_process,
    port_open,
    python_process,
    redis_process,
    start_object_store,
    wait_port_free,
)
from privads.infra.produce import produce_file
from privads.infra.settings import Settings
from privads.infra.store import connect_sync

log = logging.getLogger("privads.up")
MAX_RESTARTS = 5
READY_LINE = "PrivAds is serving on {api}  (logs in {logs}; Ctrl-C stops)"


class Stack:
    """The processes of one ``privads up``, started in order and stopped in reverse."""

    def __init__(self, settings: Settings) -> None:
        # absolute: the children run elsewhere than this process' directory
        where = {"local_data": settings.local_data.resolve()} if settings.data_on_s3 else {
            "data": str(settings.local.resolve())}
        self.settings = settings.model_copy(update=where)
        self.logs = self.settings.local / "logs"
        self.infra: list[Process] = []
        self.apps: list[Process] = []
        self.restarts: dict[str, int] = {}
        self.stopping = False

    # --- start ------------------------------------------------------------------

    def _embedded(self) -> None:
        s = self.settings
        updates: dict[str, str] = {}
        if not s.kafka:
            port = s.embedded_kafka_port
            if port_open("127.0.0.1", port):
                raise StartError(f"port {port} is in use: stop what holds it, or set PRIVADS_KAFKA to use it")
            endpoint = None
            if s.embedded_broker_storage == "s3":
                sport = s.embedded_s3_port
                if port_open("127.0.0.1", sport):
                    raise StartError(f"port {sport} is in use: stop what holds it, or set PRIVADS_EMBEDDED_S3_PORT")
                endpoint = start_object_store(sport, s.local / "broker", self.logs / "object-store.log", self.infra)
            broker = broker_process(port, self.logs / "broker.log", s3_endpoint=endpoint)
            broker.start(timeout=30)
            self.infra.append(broker)
            updates["kafka"] = f"127.0.0.1:{port}"
            log.info("embedded broker (tansu) on 127.0.0.1:%d, its log %s", port,
                     f"in {s.local / 'broker'} (S3 on {endpoint})" if endpoint else "in memory")
        if not s.redis:
            port = s.embedded_redis_port
            if port_open("127.0.0.1", port):
                raise StartError(f"port {port} is in use: stop what holds it, or set PRIVADS_REDIS to use it")
            redis = redis_process(port, s.local / "redis", self.logs / "redis.log", maxmemory=s.redis_maxmemory)
            redis.start(timeout=30)
            self.infra.append(redis)
            updates["redis"] = f"redis://127.0.0.1:{port}/0"
            log.info("embedded redis-server on 127.0.0.1:%d (AOF in %s)", port, s.local / "redis")
            self._migrate(updates["redis"])
        self.settings = s.model_copy(update=updates)

    def _migrate(self, url: str) -> None:
        """The embedded Redis of an earlier PrivAds, moved to the current key layout before anything reads it."""
        r = redis.Redis.from_url(url, socket_timeout=30)
        try:
            if holds_old_layout(r):
                log.warning("the embedded Redis holds an earlier key layout: migrating it (infra/migrate.py)")
                log.warning("migrated: %s", migrate(r, self.settings.partitions))
        finally:
            r.close()

    def _app(self, name: str, args: list[str], ready: Callable[[], bool] | None = None,
             timeout: float = 120) -> Process:
        p = python_process(name, args, self.logs / f"{name}.log", self.settings.child_env(), ready=ready)
        p.start(timeout=timeout)
        self.apps.append(p)
        return p

    def start(self) -> None:
        s = self.settings
        s.local.mkdir(parents=True, exist_ok=True)
        self._embedded()
        s = self.settings
        created = create_topics(s.kafka_servers, s.partitions, retention_s=s.topic_retention_s)
        log.info("topics ready (%d created)", len(created))
        if port_open(s.api_host, s.api_port):
            raise StartError(f"port {s.api_port} is in use: stop what holds it, or set PRIVADS_API")
        self._app("worker", ["worker"])
        # the sample catalog is in Redis before the learner's first cycle, and that cycle's version before the
        # API: the first version fits the user space to the catalog (ranker.projector.initial_projector), which
        # it may do only while no user has been learned
        catalog = s.catalog
        if catalog and catalog.is_file():
            counts = produce_file(s.kafka_servers, "privads.ads", catalog)
            log.info("sample catalog: %d ads produced from %s", counts.produced, catalog)
            stored = self._wait_catalog(counts.produced)
            log.info("sample catalog: %d ads stored by the workers", stored)
        else:
            log.warning("no sample catalog at %s; the catalog starts empty", catalog)
        self._app("learner", ["learner"], ready=lambda: self._published())
        # started once alive (/healthz); ready (/readyz) is awaited while supervising, so a child that crashes
        # meanwhile is restarted and reported like any other
        self._app("api", ["api"], ready=lambda: httpx.get(f"{s.api}/healthz", timeout=1).status_code == 200)

    def _redis(self) -> redis.Redis | redis.RedisCluster:
        return connect_sync(self.settings.redis_url, socket_timeout=5)

    def _published(self) -> bool:
        with self._redis() as r:
            return bool(r.exists(keys.MODEL_CURRENT))

    def _wait_catalog(self, produced: int, timeout: float = 120.0, still: float = 10.0) -> int:
        """Until the workers have stored ``produced`` ads (fewer if it stops growing for ``still`` s); how many."""
        deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
        with self._redis() as r:
            while True:
                n = int(r.scard(keys.ADS))
                if n >= produced:
                    return n
                if n != last:
                    last, since = n, time.monotonic()
                elif n > 0 and time.monotonic() - since > still:  # repeated ids in the file: all are stored
                    return n
                if time.monotonic() > deadline:
                    log.warning("the workers stored %d of %d catalog ads in %.0f s; starting anyway", n, produced,
                                timeout)
                    return n
                time.sleep(0.2)

    # --- run and stop ---------------------------------------------------------------

    def api_ready(self) -> tuple[bool, str]:
        """Whether the API's ``/readyz`` answers 200; if not, why (its ``reason``, or why it did not answer)."""
        try:
            r = httpx.get(f"{self.settings.api}/readyz", timeout=2)
        except httpx.HTTPError as e:
            return False, f"/readyz did not answer ({type(e).__name__}: {e})"
        if r.status_code == 200:
            return True, ""
        try:
            reason = str(r.json().get("reason") or r.text[:200])
        except ValueError:
            reason = r.text[:200]
        return False, f"/readyz answered {r.status_code}: {reason}"

    def supervise(self, ready_line: str | None = None) -> int:
        """Watch the children until asked to stop; restart a crashed app process, report it.

        ``ready_line``: printed once the API is ready (``api_ready``); meanwhile why it is
        not is logged, once per reason.
        """
        waiting_for = "" if ready_line is not None else None  # None: announced (or nothing to announce)
        while not self.stopping:
            for p in self.infra:
                code = p.poll()
                if code is not None:
                    log.error("%s exited with code %s; see %s. Stopping the stack.", p.name, code, p.log)
                    return 1
            for i, p in enumerate(self.apps):
                code = p.poll()
                if code is None:
                    continue
                n = self.restarts.get(p.name, 0) + 1
                self.restarts[p.name] = n
                if n > MAX_RESTARTS:
                    log.error("%s crashed %d times (last code %s); see %s. Stopping the stack.", p.name, n, code, p.log)
                    return 1
                log.error("%s exited with code %s; restarting (%d/%d); see %s", p.name, code, n, MAX_RESTARTS, p.log)
                fresh = Process(p.name, p.argv, p.log, env=p.env)
                fresh.start()
                self.apps[i] = fresh
            if waiting_for is not None:
                ready, why = self.api_ready()
                if ready:
                    print(ready_line, flush=True)
                    waiting_for = None
                elif why != waiting_for:
                    log.info("waiting for the API to be ready: %s", why)
                    waiting_for = why
            time.sleep(0.5 if waiting_for is None else 0.1)
        return 0

    def stop(self) -> None:
        self.stopping = True
        for p in reversed(self.apps):
            code = p.stop(self.settings.stop_timeout_s)
            log.info("%s stopped (%s)", p.name, code)
        for p in reversed(self.infra):
            p.stop(10)
            log.info("%s stopped", p.name)
        if self.infra and not self.settings_has_external_kafka:
            wait_port_free("127.0.0.1", self.settings.embedded_kafka_port)
        wait_port_free(self.settings.api_host, self.settings.api_port)

    @property
    def settings_has_external_kafka(self) -> bool:
        return not any(p.name == "broker" for p in self.infra)


def up(settings: Settings) -> int:
    """Start everything, serve until SIGINT/SIGTERM, stop everything."""
    check_bind(settings.api_host, settings)  # the API would refuse to start: fail before anything else does
    stack = Stack(settings)

    def _signal(signum: int, _frame: object) -> None:
        stack.stopping = True

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    code = 0
    try:
        stack.start()
        # not printed yet: the API answers /healthz once it runs, but serves only once /readyz says so
        code = stack.supervise(READY_LINE.format(api=stack.settings.api, logs=stack.logs))
    except StartError as e:
        print(f"privads up: {e}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        stack.stop()
        print("PrivAds stopped.", flush=True)
    return code

