"""The local Redis Cluster (``infra.redis_cluster``), on real redis-server nodes: 3 masters, 3 replicas.

* it forms: the slots split evenly over three masters, each with one replica, and a cluster client spreads keys
  over all of them and reads them back;
* a master SIGKILLed after its writes were acknowledged by its replica (``WAIT 1 1000``) is replaced by that replica,
  which still holds them, and the cluster takes writes again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from privads.infra.processes import Process
from privads.infra.redis_cluster import CLUSTER_SLOTS, LocalCluster, start_redis_cluster, stop_processes

KEYS = 1000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    procs: list[Process] = []
    try:  # started inside: a start that fails halfway still stops the nodes that did start
        yield start_redis_cluster(tmp_path, procs, timeout=15)
    finally:
        stop_processes(procs, timeout=5)


def cluster_client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(cluster.host, port) for port in cluster.ports],
                        decode_responses=True, socket_timeout=2.0)


def node(cluster: LocalCluster, port: int) -> redis.Redis:
    return redis.Redis(host=cluster.host, port=port, decode_responses=True, socket_timeout=2.0)


def test_three_masters_share_the_slots_each_with_a_replica_and_hold_keys_spread_over_them(
        cluster: LocalCluster) -> None:
    views = cluster.nodes()
    masters = [v for v in views if v.role == "master"]
    assert len(masters) == 3 and len(views) == 6 and not any(v.failed for v in views)
    assert sum(m.slot_count for m in masters) == CLUSTER_SLOTS
    assert all(abs(m.slot_count - CLUSTER_SLOTS / 3) < 1 for m in masters)
    assert sorted(cluster.masters()) == sorted(m.port for m in masters)
    for m in masters:
        assert len(cluster.replicas_of(m.port)) == 1
    assert sorted(cluster.replicas()) == sorted(v.port for v in views if v.role == "replica")
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in cluster.ports)
    assert cluster.ports[:3] == cluster.masters()  # started masters first, node i holding the i-th third

    rc = cluster_client(cluster)
    try:
        values = {f"ad:{i}": f"value-{i}" for i in range(KEYS)}
        for key, value in values.items():
            assert rc.set(key, value)
        assert len({rc.keyslot(key) for key in values}) > KEYS * 0.9  # spread over slots, not a few
        assert rc.mget_nonatomic(list(values)) == list(values.values())
        # every master holds about a third, and only its own slots' keys
        per_master = Counter(rc.get_node_from_key(key).port for key in values)
        assert sorted(per_master) == sorted(cluster.masters()) and min(per_master.values()) > KEYS * 0.25
        for port, count in per_master.items():
            with node(cluster, port) as r:
                assert r.dbsize() == count
    finally:
        rc.close()


def test_a_killed_master_is_replaced_by_its_replica_with_the_acknowledged_writes(cluster: LocalCluster) -> None:
    rc = cluster_client(cluster)
    try:
        values = {f"user:{i}": f"state-{i}" for i in range(200)}
        for key, value in values.items():
            rc.set(key, value)
        # the writes' own connections (one per master: the client reuses it) wait for the replica's acknowledgement
        for port in cluster.masters():
            assert rc.wait(1, 1000, target_nodes=rc.get_node(cluster.host, port)) == 1

        owner = rc.get_node_from_key("user:42").port
        held = [key for key in values if rc.get_node_from_key(key).port == owner]
        [replica] = cluster.replicas_of(owner)
        promoted = cluster.kill_master(owner)
        assert promoted == replica
        assert cluster.processes[cluster.ports.index(owner)].poll() is not None
        assert owner not in cluster.masters() and promoted in cluster.masters() and len(cluster.masters()) == 3

        # the promoted replica serves the killed master's slots with every acknowledged write
        assert "user:42" in held and len(held) > 40
        with node(cluster, promoted) as r:
            assert r.execute_command("ROLE")[0] == "master"
            assert r.dbsize() == len(held)
            for key in held:  # one by one: MGET refuses keys of different slots (CROSSSLOT)
                assert r.get(key) == values[key]

        # the client finds the new master (its first command after the kill meets the dead node and re-reads
        # the slots), and writes succeed again, there and on the other masters
        assert rc.get("user:42") == "state-42"
        assert rc.get_node_from_key("user:42").port == promoted
        assert rc.set("user:42", "after") and rc.get("user:42") == "after"
        for key in values:
            rc.set(key, f"{values[key]}-2")
        assert rc.mget_nonatomic(list(values)) == [f"{v}-2" for v in values.values()]
    finally:
        rc.close()
