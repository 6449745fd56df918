"""A local Redis Cluster (masters and their replicas) from the redis-server PrivAds ships.

There is no redis-cli beside that binary, so the cluster is formed the way redis-cli would form it, one CLUSTER
command at a time through redis-py: each master takes an even share of the 16384 slots (ADDSLOTSRANGE), the first
node meets the others (MEET), each replica follows its master (REPLICATE), and the cluster counts as started once
every node reports ``cluster_state:ok``, agrees on who replicates whom, and every replica's link to its master is up.

Each node is a ``Process`` (``infra.processes``): its own data folder (AOF and ``nodes.conf``) and log file in the
directory given. The nodes time each other out after ``DEFAULT_NODE_TIMEOUT_MS``, short, so that a killed master's
replica takes over within seconds (``LocalCluster.kill_master``).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from privads.infra.errors import StartError, Unavailable
from privads.infra.processes import DEFAULT_REDIS_MAXMEMORY, Process, free_port, redis_process

CLUSTER_SLOTS = 16384
DEFAULT_NODE_TIMEOUT_MS = 1000


def cluster_node_process(port: int, data_dir: Path, log: Path, host: str = "127.0.0.1",
                         maxmemory: str = DEFAULT_REDIS_MAXMEMORY, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS,
                         cluster_port: int | None = None) -> Process:
    """A cluster-enabled redis-server: ``redis_process`` (AOF, ``noeviction``) with the cluster's options.

    Parameters
    ----------
    port : int
        Client port.
    data_dir : Path
        The node's own folder: its AOF and its ``nodes.conf`` (the cluster's state as this node knows it).
    log : Path
    host : str
    maxmemory : str
        As for ``redis_process``.
    node_timeout_ms : int
        How long a node may not answer before the others count it as failing; a killed master's replica takes
        over about two of these after the kill.
    cluster_port : int, optional
        The cluster bus port, which other nodes gossip with; Redis' default is ``port + 10000``, which does not
        exist above port 55535, where ``free_port`` often answers.
    """
    extra = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",  # in data_dir: redis-server runs there (--dir)
        "--cluster-node-timeout", str(node_timeout_ms),
        # a replica however long disconnected still fails over: data loss in a test beats a cluster that stays down
        "--cluster-replica-validity-factor", "0",
        "--cluster-allow-reads-when-down", "no",
        # a master's first sync to a replica starts at once, not after the 5s it waits by default for more replicas
        # to share one transfer: each master here has its replicas attach at about the same moment anyway
        "--repl-diskless-sync-delay", "0",
    ]
    if cluster_port is not None:
        extra += ["--cluster-port", str(cluster_port)]
    proc = redis_process(port, data_dir, log, host=host, maxmemory=maxmemory, extra=extra)
    proc.name = f"redis cluster node {host}:{port}"  # errors name the node, not just "redis"
    return proc


def stop_processes(procs: Sequence[Process], timeout: float = 10.0) -> None:
    """Stop every one of ``procs``, even when stopping one raises; then raise the first such error.

    All are sent SIGTERM first, so that they shut down (write their AOF, say goodbye to their replicas) together
    rather than one after another.
    """
    first: BaseException | None = None
    for proc in procs:
        try:
            proc.signal(signal.SIGTERM)
        except OSError as e:  # stop() below tries again, and SIGKILLs it after the timeout
            first = first or e
    for proc in procs:
        try:
            proc.stop(timeout)
        except BaseException as e:  # noqa: BLE001 - the others still have to stop; re-raised below
            first = first or e
    if first is not None:
        raise first


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as ``CLUSTER NODES`` describes it.

    ``role`` is "master" or "replica"; ``master_port`` is the port of the master a replica follows (None for a
    master). ``failed``: flagged ``fail`` or ``fail?`` by the node asked. ``slots``: inclusive ranges it serves.
    """

    id: str
    port: int
    role: str
    master_id: str | None
    master_port: int | None
    failed: bool
    slots: tuple[tuple[int, int], ...]

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES``' reply as ``NodeView``s, in its order (hostnames, migrating slots and handshakes ignored)."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    port_of = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
    views = []
    for row in rows:
        node_id, flags = row[0], set(row[2].split(","))
        if "handshake" in flags or "noaddr" in flags:
            continue  # not (yet) a member: MEET has not finished
        master_id = None if row[3] == "-" else row[3]
        slots = []
        for token in row[8:]:
            if token.startswith("["):  # a slot being migrated or imported, still served by its owner
                continue
            start, _, end = token.partition("-")
            slots.append((int(start), int(end or start)))
        views.append(NodeView(
            id=node_id,
            port=port_of[node_id],
            role="replica" if "slave" in flags else "master",
            master_id=master_id,
            master_port=port_of.get(master_id) if master_id else None,
            failed=bool(flags & {"fail", "fail?"}),
            slots=tuple(sorted(slots)),
        ))
    return views


def _client(host: str, port: int) -> redis.Redis:
    # short timeouts: a killed node must not hold up a poll for long
    return redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0)


def _ask(host: str, port: int, *args: str | int) -> str:
    """One command to one node on a connection of its own; the reply as text."""
    client = _client(host, port)
    try:
        return str(client.execute_command(*args))
    finally:
        client.close()


def _cluster_state(host: str, port: int) -> str | None:
    """``cluster_state`` as ``CLUSTER INFO`` reports it ("ok" or "fail"); INFO's cluster section lacks it."""
    fields = dict(line.split(":", 1) for line in _ask(host, port, "CLUSTER", "INFO").splitlines() if ":" in line)
    return fields.get("cluster_state", "").strip() or None


def _info(host: str, port: int, section: str) -> dict[str, str]:
    """A section of INFO (``replication``), each field's value as text."""
    client = _client(host, port)
    try:
        return {name: str(value) for name, value in client.info(section).items()}
    finally:
        client.close()


def _wait_for(check: Callable[[], str | None], deadline: float, what: str) -> None:
    """Poll ``check`` (None: done; else why not) until done or ``deadline`` (monotonic): then StartError naming
    ``what`` and the last reason."""
    reason = "not checked"
    while True:
        try:
            found = check()
        except redis.RedisError as e:  # a node not answering (yet): keep polling, report it if it lasts
            found = f"{type(e).__name__}: {e}"
        if found is None:
            return
        reason = found
        if time.monotonic() >= deadline:
            raise StartError(f"{what}: {reason}")
        time.sleep(0.05)


@dataclass
class LocalCluster:
    """A running local Redis Cluster: its node processes and their ports, in start order (masters first).

    Roles change after a failover: ``masters``, ``replicas`` and ``nodes`` ask the cluster, never this record.
    """

    processes: list[Process]
    ports: list[int]
    host: str = "127.0.0.1"
    node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS

    @property
    def url(self) -> str:
        """``redis+cluster://host:p1,host:p2,...``: every node, the masters as started first."""
        return "redis+cluster://" + ",".join(f"{self.host}:{port}" for port in self.ports)

    def alive(self) -> list[int]:
        """Ports of the nodes whose process still runs."""
        return [port for port, proc in zip(self.ports, self.processes, strict=True) if proc.poll() is None]

    def nodes(self) -> list[NodeView]:
        """Every node as the first live node that answers sees it now (``CLUSTER NODES``)."""
        last: Exception | None = None
        for port in self.alive():
            try:
                return parse_cluster_nodes(_ask(self.host, port, "CLUSTER", "NODES"))
            except redis.RedisError as e:
                last = e
        raise Unavailable(f"no node of the cluster at {self.url} answers: {last}")

    def masters(self) -> list[int]:
        """Ports of the live masters now, ordered by the first slot each serves (index 0 holds slot 0)."""
        return [n.port for n in _masters(self.nodes())]

    def replicas(self) -> list[int]:
        """Ports of the live replicas now."""
        return [n.port for n in self.nodes() if n.role == "replica" and not n.failed]

    def replicas_of(self, master_port: int) -> list[int]:
        """Ports of the live replicas following the master on ``master_port``."""
        return [n.port for n in self.nodes() if n.role == "replica" and not n.failed and n.master_port == master_port]

    def kill_master(self, master: int, timeout: float = 15.0) -> int:
        """SIGKILL a master and wait until one of its replicas has taken over its slots.

        Parameters
        ----------
        master : int
            Its port, or its index in ``masters()``.
        timeout : float
            Seconds to wait for the takeover.

        Returns
        -------
        int
            The port of the promoted replica.

        Raises
        ------
        StartError
            No replica to promote, or no promotion, or a surviving node not back to ``cluster_state:ok``, in time.
        """
        views = self.nodes()
        masters = [n.port for n in _masters(views)]
        if master in self.ports:
            port = master
        elif 0 <= master < len(masters):
            port = masters[master]
        else:
            raise ValueError(f"{master} is neither a node's port nor an index of the {len(masters)} masters")
        if port not in masters:
            raise ValueError(f"node {self.host}:{port} is not a live master (masters: {masters})")
        view = next(n for n in views if n.port == port)
        candidates = [n.port for n in views if n.role == "replica" and not n.failed and n.master_id == view.id]
        if not candidates:
            raise StartError(f"master {self.host}:{port} has no live replica to take over its slots")

        proc = self.processes[self.ports.index(port)]
        proc.signal(signal.SIGKILL)
        if proc.popen is not None:
            try:
                proc.popen.wait(5)  # reaped now: it is gone from alive(), and polls never ask it
            except subprocess.TimeoutExpired as e:
                raise StartError(f"master {self.host}:{port} still runs 5s after SIGKILL") from e

        promoted: list[int] = []

        def taken_over() -> str | None:
            mine = [c for c in candidates if _info(self.host, c, "replication").get("role") == "master"]
            if not mine:
                return f"no replica of {port} ({candidates}) promoted yet"
            for node in self.alive():
                if (state := _cluster_state(self.host, node)) != "ok":
                    return f"node {node} reports cluster_state:{state}"
                seen = {n.port: n for n in parse_cluster_nodes(_ask(self.host, node, "CLUSTER", "NODES"))}
                new = seen.get(mine[0])
                if new is None or new.role != "master" or new.slots != view.slots:
                    return f"node {node} does not yet see {mine[0]} as the master of {port}'s slots"
            promoted[:] = mine[:1]
            return None

        _wait_for(taken_over, time.monotonic() + timeout,
                  f"no replica took over from the killed master {self.host}:{port} within {timeout:g}s")
        return promoted[0]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node, even when stopping one raises (then the first error is raised after)."""
        stop_processes(self.processes, timeout)


def _masters(views: list[NodeView]) -> list[NodeView]:
    """The live masters serving slots, ordered by the first slot each serves."""
    return sorted((n for n in views if n.role == "master" and not n.failed and n.slots), key=lambda n: n.slots[0])


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (``free_port`` alone may answer one twice)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def start_redis_cluster(directory: Path, procs: list[Process], masters: int = 3, replicas_per_master: int = 1,
                        timeout: float = 30.0, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS,
                        host: str = "127.0.0.1", maxmemory: str = DEFAULT_REDIS_MAXMEMORY) -> LocalCluster:
    """Start and form a Redis Cluster on free loopback ports, its nodes' folders and logs in ``directory``.

    Each node is appended to ``procs`` as soon as it runs (the caller stops them, ``stop_processes``), so a start
    that fails halfway leaves nothing the caller cannot stop.

    Parameters
    ----------
    directory : Path
        Node ``i`` keeps its data in ``node-i/`` and logs to ``node-i.log``.
    procs : list of Process
    masters : int
        Masters, each serving an even share of the 16384 slots (they differ by at most one).
    replicas_per_master : int
        Replicas following each master.
    timeout : float
        Seconds for all of it: starting the nodes and forming the cluster.
    node_timeout_ms : int
        ``cluster-node-timeout``: see ``cluster_node_process``.

    Raises
    ------
    StartError
        A node did not start, or the cluster did not form in time; the message says what was missing.
    """
    if masters < 1 or replicas_per_master < 0:
        raise ValueError(f"a cluster needs a master or more and no negative replica count, not "
                         f"masters={masters}, replicas_per_master={replicas_per_master}")
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 0.5)

    count = masters * (1 + replicas_per_master)
    ports = _free_ports(2 * count)
    ports, bus_ports = ports[:count], ports[count:]
    nodes: list[Process] = []
    for i, (port, bus) in enumerate(zip(ports, bus_ports, strict=True)):
        proc = cluster_node_process(port, directory / f"node-{i}", directory / f"node-{i}.log", host=host,
                                    maxmemory=maxmemory, node_timeout_ms=node_timeout_ms, cluster_port=bus)
        proc.start(left())
        procs.append(proc)
        nodes.append(proc)

    try:
        ids = [_ask(host, port, "CLUSTER", "MYID") for port in ports]
        for i in range(masters):
            # distinct config epochs before the nodes meet, as redis-cli does: no epoch collision for gossip to settle
            _ask(host, ports[i], "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            first, last = i * CLUSTER_SLOTS // masters, (i + 1) * CLUSTER_SLOTS // masters - 1
            _ask(host, ports[i], "CLUSTER", "ADDSLOTSRANGE", first, last)
        for port, bus in zip(ports[1:], bus_ports[1:], strict=True):
            _ask(host, ports[0], "CLUSTER", "MEET", host, port, bus)  # gossip introduces the rest to each other
    except redis.RedisError as e:
        raise StartError(f"the redis cluster nodes in {directory} refused to form a cluster: {e}") from e

    def all_met() -> str | None:
        for port in ports:
            known = {n.id for n in parse_cluster_nodes(_ask(host, port, "CLUSTER", "NODES"))}
            if missing := len(set(ids) - known):
                return f"node {port} does not know {missing} of the {count} nodes yet"
        return None

    _wait_for(all_met, deadline, f"the {count} redis cluster nodes did not all meet within {timeout:g}s")

    # replica r of master m: node masters + m * replicas_per_master + r
    master_of = {masters + m * replicas_per_master + r: m for m in range(masters) for r in range(replicas_per_master)}
    for replica, m in master_of.items():
        try:
            _ask(host, ports[replica], "CLUSTER", "REPLICATE", ids[m])
        except redis.RedisError as e:
            raise StartError(f"redis cluster node {ports[replica]} refused to replicate {ports[m]}: {e}") from e

    def formed() -> str | None:
        for port in ports:
            if (state := _cluster_state(host, port)) != "ok":
                return f"node {port} reports cluster_state:{state}"
            views = {n.id: n for n in parse_cluster_nodes(_ask(host, port, "CLUSTER", "NODES"))}
            for replica, m in master_of.items():
                seen = views.get(ids[replica])
                if seen is None or seen.master_id != ids[m]:
                    return f"node {port} does not yet see {ports[replica]} as a replica of {ports[m]}"
            if failing := [n.port for n in views.values() if n.failed]:
                return f"node {port} sees {failing} as failing"
        for replica, m in master_of.items():
            if (link := _info(host, ports[replica], "replication").get("master_link_status")) != "up":
                return f"replica {ports[replica]}'s link to its master {ports[m]} is {link}"
        return None

    _wait_for(formed, deadline, f"the redis cluster in {directory} was not ready within {timeout:g}s")
    return LocalCluster(processes=nodes, ports=ports, host=host, node_timeout_ms=node_timeout_ms)
