"""``privads bench stream``: end-to-end worker throughput, the bare-consumer floor, freshness and memory.

Everything runs on fresh infrastructure started for the bench (tansu + redis-server on free ports),
with real worker processes, and traffic from a separate producer process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from privads.bench.scratch import scratch_dir
from privads.infra import keys, progress, records
from privads.infra.kafka import consumer_config, create_topics
from privads.infra.processes import Process, python_process, start_private_infra
from privads.infra.produce import produce_lines
from privads.infra.settings import Settings
from privads.infra.store import connect_sync
from privads.ranker.quality import histogram_quantile


def _wait(check: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"bench: timed out waiting for {what}")


def _stat(r: redis.Redis | redis.RedisCluster, name: str) -> int:
    return int(r.hget(keys.STATS, name) or 0)


async def _raw_consume(servers: str, topic: str, expected: int) -> float:
    """Messages/s of a bare aiokafka getmany loop reading ``topic`` from the start."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, **consumer_config(servers, group_id=None))
    await c.start()
    try:
        n, start = 0, time.perf_counter()
        while n < expected:
            got = await c.getmany(timeout_ms=1000, max_records=50_000)
            if not got and time.perf_counter() - start > 60:
                break
            n += sum(len(m) for m in got.values())
        return n / (time.perf_counter() - start)
    finally:
        await c.stop()


def _loadgen(servers: str, n: int, users: int, rate: float, seed: int, ads_file: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "privads.bench.loadgen", servers, str(n), str(users), str(rate),
                          str(seed), str(ads_file)], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_stream(settings: Settings, events: int, users: int, workers: int, partitions: int,
                 fresh_rate: float, fresh_seconds: float, window_s: float, catalog: Path,
                 broker_storage: str = "memory", redis_topology: str = "single") -> dict:
    """Run the stream benchmark; returns its figures.

    ``broker_storage``: the embedded broker's log in memory, or on its S3 object store
    (``infra/processes.py: object_store_process``). ``redis_topology``: one redis-server, or a local
    cluster of 3 masters and 3 replicas (``infra/redis_cluster.py``), all on this machine.
    """
    with scratch_dir("privads-bench-stream-") as tmp:
        procs: list[Process] = []
        try:
            kafka, redis_url = start_private_infra(tmp, procs, broker_storage=broker_storage,
                                                   redis_topology=redis_topology)
            s = settings.model_copy(update={
                "kafka": kafka, "redis": redis_url, "data": tmp,
                "partitions": partitions, "attribution_window_s": window_s, "dedupe_horizon_s": window_s,
                "catalog": None})
            create_topics(s.kafka_servers, partitions)
            r = connect_sync(s.redis_url)
            since = time.time()
            for i in range(workers):
                w = python_process(f"worker{i}", ["worker"], tmp / f"worker{i}.log", s.child_env())
                w.start()
                procs.append(w)

            def owned() -> int:
                beats = [json.loads(v) for v in r.hgetall(keys.WORKERS).values()]
                return sum(b["partitions"] for b in beats if b["ts"] >= since and time.time() - b["ts"] < 3)

            _wait(lambda: owned() == partitions, 120, "the workers to own every partition")
            lines = [ln for ln in catalog.read_text().splitlines() if ln.strip()]
            produce_lines(s.kafka_servers, records.ADS, lines)
            _wait(lambda: r.scard(keys.ADS) == len(lines), 300, "the catalog to be encoded")
            ads_file = tmp / "ads.json"
            ads_file.write_text(json.dumps([json.loads(ln)["ad_id"] for ln in lines]))

            # 1. throughput: as fast as the producer can go, workers running
            start = time.time()
            progress.stage(f"bench stream: producing {events} events as fast as the producer goes")
            sent = _loadgen(s.kafka_servers, events, users, 0, 1, ads_file)
            processed = lambda: (_stat(r, f"processed:{records.IMPRESSIONS}")  # noqa: E731
                                 + _stat(r, f"processed:{records.CLICKS}"))
            with progress.bar("bench stream: events processed", total=sent["events"], unit="ev") as bar:
                def done() -> bool:
                    n = processed()
                    bar.update(n - bar.n)
                    return n >= sent["events"]

                _wait(done, 1800, "the workers to process every event", every=0.05)
            elapsed = time.time() - start
            joined = _stat(r, "labelled_clicks")
            # every impression is labelled once its window closes
            _wait(lambda: _stat(r, "labelled_clicks") + _stat(r, "labelled_negatives") >= sent["impressions"],
                  window_s + 120, "every impression to be labelled")
            raw = asyncio.run(_raw_consume(s.kafka_servers, records.IMPRESSIONS, sent["impressions"]))

            # 2. freshness at a steady rate
            r.delete(keys.FRESHNESS)
            progress.stage(f"bench stream: freshness at {fresh_rate:.0f} events/s for {fresh_seconds:.0f} s")
            _loadgen(s.kafka_servers, int(fresh_rate * fresh_seconds), users, fresh_rate, 2, ads_file)
            _wait(lambda: sum(int(v) for v in r.hgetall(keys.FRESHNESS).values()) > 0, 60, "freshness samples")
            time.sleep(2)
            hist = {int(k): int(v) for k, v in r.hgetall(keys.FRESHNESS).items()}

            # 3. memory per user (the value and Redis' own overhead for the key)
            # the first 2000 keys the scan yields (there may be fewer)
            sample = [k for _, k in zip(range(2000), r.scan_iter(match=keys.USER_PREFIX + "*", count=1000),
                                        strict=False)]
            sizes = [r.memory_usage(k, samples=0) or 0 for k in sample]
            first = r.get(sample[0]) if sample else None  # None too if the key went between the scan and the read
            return {
                "events": sent["events"], "impressions": sent["impressions"], "clicks": sent["clicks"],
                "users": users, "workers": workers, "partitions": partitions, "cores": os.cpu_count(),
                "broker_storage": broker_storage, "redis_topology": redis_topology,
                "events_per_s": round(sent["events"] / elapsed),
                "producer_events_per_s": round(sent["events"] / sent["seconds"]),
                "raw_consume_per_s": round(raw),
                "clicks_joined_at_end_of_throughput": joined,
                "freshness_rate_events_per_s": fresh_rate,
                "freshness_p50_ms": histogram_quantile(hist, 0.5), "freshness_p99_ms": histogram_quantile(hist, 0.99),
                "freshness_samples": sum(hist.values()),
                "bytes_per_user": round(sum(sizes) / len(sizes)) if sizes else None,
                "user_value_bytes": len(first) if first is not None else None,
                "users_learned": r.dbsize() and sum(1 for _ in r.scan_iter(match=keys.USER_PREFIX + "*", count=10000)),
                "dead_letters": _stat(r, "dead_letters"), "forwarded": _stat(r, "forwarded"),
            }
        finally:
            for p in reversed(procs):
                p.stop(20)
