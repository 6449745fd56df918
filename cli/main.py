"""The ``privads`` command line (README.md, "Command line"). Every failure exits non-zero with one line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from privads.infra import progress
from privads.infra.objects import archive_of
from privads.infra.processes import port_open
from privads.infra.settings import Settings


def _running(settings: Settings, need_redis: bool = True, need_kafka: bool = True) -> Settings:
    """Settings pointing at a running stack: the configured URLs, else the embedded defaults if up."""
    updates = {}
    if need_kafka and not settings.kafka:
        if not port_open("127.0.0.1", settings.embedded_kafka_port):
            raise RuntimeError("PRIVADS_KAFKA is not set and no embedded broker is running (start `privads up`)")
        updates["kafka"] = f"127.0.0.1:{settings.embedded_kafka_port}"
    if need_redis and not settings.redis:
        if not port_open("127.0.0.1", settings.embedded_redis_port):
            raise RuntimeError("PRIVADS_REDIS is not set and no embedded redis-server is running (start `privads up`)")
        updates["redis"] = f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
    return settings.model_copy(update=updates)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from privads.cli.supervisor import up

    return up(settings)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from privads.streams.worker import run_worker

    run_worker(_running(settings))
    return 0


def cmd_learner(settings: Settings, args: argparse.Namespace) -> int:
    from privads.learner.cycle import run_loop

    run_loop(_running(settings))
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from privads.learner.cycle import run_cycle

    manifest = asyncio.run(run_cycle(_running(settings), reason="manual"))
    print(json.dumps({"version": manifest["version"], "index": manifest["index"], "path": manifest["path"]}))
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from privads.api.server import check_bind, serve

    host, port = args.host or settings.api_host, args.port or settings.api_port
    check_bind(host, settings)  # before anything is connected: an open API beyond loopback never starts
    serve(_running(settings), host, port)
    return 0


def cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from privads.infra.kafka import create_topics

    created = create_topics(_running(settings, need_redis=False).kafka_servers, settings.partitions,
                            retention_s=settings.topic_retention_s)
    print(json.dumps({"created": created}))
    return 0


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from privads.infra.produce import produce_file

    counts = produce_file(_running(settings, need_redis=False).kafka_servers, args.topic, args.file)
    out = {"topic": args.topic, "produced": counts.produced, "invalid": counts.invalid}
    if counts.skipped:
        out["skipped_not_clicked"] = counts.skipped
    print(json.dumps(out))
    return 0


def _bid(text: str) -> float | None:
    """``--bid``: a bid ≥ 0, or ``catalog`` (None: drawn like the catalog's)."""
    if text == "catalog":
        return None
    try:
        bid = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor `catalog`") from None
    if not bid >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a bid must be ≥ 0")
    return bid


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from privads.bench.simulate import run_simulation

    key = settings.api_key.get_secret_value() if settings.api_key else None
    catalog = settings.catalog if settings.catalog is not None and settings.catalog.is_file() else None
    out = asyncio.run(run_simulation(settings.api, args.users, args.ads, args.requests, seed=args.seed, k=args.k,
                                     concurrency=args.concurrency, bid=args.bid, catalog=catalog, api_key=key,
                                     context=args.context))
    print(json.dumps(out))
    return 0


def cmd_export_logs(settings: Settings, args: argparse.Namespace) -> int:
    from privads.learner.erasure import erased_of, without_erased
    from privads.learner.logs import settled_rows, write_rows

    # the erasure registry is in the stack's Redis: an export that could not read it could hold erased users
    running = _running(settings, need_kafka=False)
    rows = settled_rows(archive_of(settings), settings.attribution_window_s)
    progress.stage(f"export-logs: {len(rows)} settled impressions; leaving out erased users")
    erased = asyncio.run(erased_of(running, [r["user_id"] for r in rows]))
    keep = without_erased([r["user_id"] for r in rows], [r["ts"] for r in rows], erased)
    rows = [r for r, k in zip(rows, keep.tolist(), strict=True) if k]
    progress.stage(f"export-logs: writing {len(rows)} rows to {args.out}")
    write_rows(rows, args.out, settings)
    print(json.dumps({"out": str(args.out), "rows": len(rows), "clicked": sum(r["clicked"] for r in rows),
                      "erased_rows_left_out": int((~keep).sum())}))
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from privads.learner.replay import parse_estimators, run

    needs_redis = args.policy not in ("uniform", "popularity", "logged")
    if not needs_redis and args.format != "obd":
        # PrivAds' own logs: erased users are left out whenever the stack's erasure registry can be read
        try:
            settings, needs_redis = _running(settings, need_kafka=False), True
        except RuntimeError:
            pass
    report = run(_running(settings, need_kafka=False) if needs_redis else settings, args.logs, args.policy,
                 parse_estimators(args.estimators), args.format, ci=args.ci, n_bootstrap=args.bootstrap,
                 seed=args.seed, draws=args.draws, reward=args.reward, registry=needs_redis)
    print(json.dumps(report))
    return 0


def cmd_lift(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    r = httpx.get(f"{settings.api}/lift", params={"window": args.window}, timeout=10)
    if r.status_code != 200:
        raise RuntimeError(f"GET /lift answered {r.status_code}: {r.text[:200]}")
    body = r.json()
    print(f"{'arm':<12}{'impressions':>12}{'clicks':>10}{'ctr':>10}  ci95")
    for name, a in sorted(body["arms"].items()):
        lo, hi = a["ci95"]
        print(f"{name:<12}{a['impressions']:>12}{a['clicks']:>10}{a['ctr']:>10.4f}  [{lo:.4f}, {hi:.4f}]")
    if body["lift"] is None:
        print("lift: n/a (needs clicks in both arms)")
    else:
        lo, hi = body["lift_ci95"]
        print(f"lift: {body['lift']:+.2%}  ci95 [{lo:+.2%}, {hi:+.2%}]  p={body['p_value']:.4g}")
    if any(a["value"] for a in body["arms"].values()):  # clicks that carried a value
        print(f"\n{'arm':<12}{'value':>12}{'per impr.':>12}  ci95")
        for name, a in sorted(body["arms"].items()):
            lo, hi = a["value_ci95"] or (0.0, 0.0)
            print(f"{name:<12}{a['value']:>12.2f}{a['value_per_impression']:>12.5f}  [{lo:.5f}, {hi:.5f}]")
        if body["value_lift"] is None:
            print("value lift: n/a (needs value in both arms)")
        else:
            lo, hi = body["value_lift_ci95"]
            slo, shi = body["value_lift_ci95_sequential"]
            print(f"value lift: {body['value_lift']:+.2%}  ci95 [{lo:+.2%}, {hi:+.2%}]  "
                  f"always-valid [{slo:+.2%}, {shi:+.2%}]  p={body['value_p_value']:.4g}")
    return 0


def cmd_migrate_redis(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate ``PRIVADS_REDIS`` (one redis-server); unset, the embedded one's AOF, on a redis-server of its own."""
    import redis

    from privads.infra.migrate import migrate
    from privads.infra.processes import free_port, redis_process

    if settings.redis and not settings.redis.startswith("redis://"):
        raise ValueError("PRIVADS_REDIS: the earlier key layout ran on one redis-server only (redis://); "
                         "nothing to migrate")
    server = None
    url = settings.redis
    if url is None:
        if port_open("127.0.0.1", settings.embedded_redis_port):
            raise RuntimeError("the embedded redis-server is running: stop `privads up` first")
        port = free_port()
        server = redis_process(port, settings.local / "redis", settings.local / "logs" / "redis-migrate.log",
                               maxmemory=settings.redis_maxmemory)
        server.start(timeout=60)
        url = f"redis://127.0.0.1:{port}/0"
    try:
        r = redis.Redis.from_url(url, socket_timeout=60)
        try:
            print(json.dumps(migrate(r, settings.partitions)))
        finally:
            r.close()
    finally:
        if server is not None:
            server.stop(30)
    return 0


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.what == "stream":
        from privads.bench.stream import bench_stream

        out = bench_stream(settings, events=args.events, users=args.users or 100_000, workers=args.workers,
                           partitions=args.partitions, fresh_rate=args.fresh_rate, fresh_seconds=args.fresh_seconds,
                           window_s=args.window, catalog=args.catalog, broker_storage=args.broker_storage,
                           redis_topology=args.redis)
    elif args.what == "serve":
        from privads.bench.serve import bench_serve

        out = bench_serve(settings, ads=args.ads or 1_000_000, concurrency=args.concurrency, duration_s=args.duration,
                          warmup_s=args.warmup, api_workers=args.api_workers)
    elif args.what == "cycle":
        from privads.bench.cycle import bench_cycle

        out = bench_cycle(settings, args.impressions, days=args.days, ads=args.ads or 2000,
                          users=args.users or 100_000, seed=args.seed)
    elif args.what == "policies":
        from privads.bench.policies import PEERS, bench_policies

        names = tuple(n.strip() for n in args.policies.split(",") if n.strip()) if args.policies else PEERS
        out = bench_policies(settings, users=args.users or 400, ads=args.ads or 200, requests=args.requests,
                             seed=args.seed, policies=names, plot_path=args.plot, bid=args.bid,
                             label_delay=args.label_delay, catalog=args.catalog)
    else:
        from privads.bench.learn import bench_learn
        from privads.infra.runtime import keep_freed_memory

        keep_freed_memory()  # the ranker is timed in its serving form, under the API's allocator settings
        out = bench_learn(settings, args.catalog, args.encoder or settings.encoder_backend, args.ads or 1_000_000)
    print(json.dumps(out))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privads", description="PrivAds: streaming, online-learning ad recommender")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # the commands that can run longer than a few seconds report their progress on stderr (infra/progress.py)
    long = argparse.ArgumentParser(add_help=False)
    long.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (the result, on stdout, "
                      "is the same)")
    sub.add_parser("up", help="the whole stack, foreground; says it serves once /readyz is 200; Ctrl-C stops it"
                   ).set_defaults(fn=cmd_up)
    sub.add_parser("worker", help="the stream worker (batch agents over aiokafka)").set_defaults(fn=cmd_worker)
    sub.add_parser("learner", help="the periodic learner loop").set_defaults(fn=cmd_learner)
    sub.add_parser("train", help="one learner cycle now", parents=[long]).set_defaults(fn=cmd_train)
    a = sub.add_parser("api", help="the HTTP API (uvicorn)")
    a.add_argument("--host", default=None)
    a.add_argument("--port", type=int, default=None)
    a.set_defaults(fn=cmd_api)
    sub.add_parser("topics", help="create the topics with explicit partition counts").set_defaults(fn=cmd_topics)
    sub.add_parser("migrate-redis", help="rename the keys of an earlier PrivAds' Redis to the current layout "
                   "(PrivAds stopped)").set_defaults(fn=cmd_migrate_redis)
    pr = sub.add_parser("produce", help="produce JSON-lines events from FILE or stdin", parents=[long])
    pr.add_argument("topic")
    pr.add_argument("file", nargs="?", type=Path, default=None)
    pr.set_defaults(fn=cmd_produce)
    sm = sub.add_parser("simulate", help="a synthetic audience with a known click model against the running API",
                        parents=[long])
    sm.add_argument("--users", type=int, required=True)
    sm.add_argument("--ads", type=int, required=True)
    sm.add_argument("--requests", type=int, required=True)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--k", type=int, default=10, help="ads per request")
    sm.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    sm.add_argument("--bid", type=_bid, default=None, metavar="B|catalog",
                    help="the audience's ads' bid: a number, or `catalog` (the default): each ad's bid drawn from "
                    "the catalog's (PRIVADS_CATALOG; 1.0 without one), never above it")
    sm.add_argument("--context", type=float, default=0.0, metavar="STRENGTH",
                    help="requests carry a device and a daypart that scale each topic's interest by exp(STRENGTH·z) "
                    "(0, the default: no context; 0.7 is a strong effect): what only a ranker reading the context "
                    "can learn")
    sm.set_defaults(fn=cmd_simulate)
    ex = sub.add_parser("export-logs", help="archived impressions joined with their clicks, as JSONL or Parquet",
                        parents=[long])
    ex.add_argument("out", help="OUT.jsonl or OUT.parquet: a path, or an s3://bucket/key URL (AWS_* settings)")
    ex.set_defaults(fn=cmd_export_logs)
    rp = sub.add_parser("replay", help="offline evaluation of a policy on logged impressions (JSON report)",
                        parents=[long])
    rp.add_argument("logs", help="a path, or an s3://bucket/key URL (AWS_* settings)")
    rp.add_argument("--policy", required=True, help="uniform | popularity | logged | current | a model version")
    rp.add_argument("--estimators", default="replay,ips,snips,dm,dr")
    rp.add_argument("--format", choices=["jsonl", "parquet", "obd"], default=None, help="default: by extension")
    rp.add_argument("--ci", choices=["normal", "bootstrap"], default="normal",
                    help="analytic (delta method) or percentile bootstrap intervals")
    rp.add_argument("--bootstrap", type=int, default=500, help="resamples, with --ci bootstrap")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--draws", type=int, default=256, help="model policies: Monte-Carlo draws per request")
    rp.add_argument("--reward", choices=["clicked", "value"], default="clicked")
    rp.set_defaults(fn=cmd_replay)
    lf = sub.add_parser("lift", help="online CTR per arm and lift, as a table")
    lf.add_argument("--window", type=float, default=3600.0)
    lf.set_defaults(fn=cmd_lift)
    b = sub.add_parser("bench", help="benchmarks; each prints one JSON object", parents=[long])
    b.add_argument("what", choices=["serve", "stream", "learn", "policies", "cycle"])
    b.add_argument("--events", type=int, default=1_000_000)
    b.add_argument("--users", type=int, default=None, help="stream, cycle: 100000; policies: the audience's (400)")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--partitions", type=int, default=4)
    b.add_argument("--fresh-rate", type=float, default=10_000.0, help="events/s of the freshness phase")
    b.add_argument("--fresh-seconds", type=float, default=20.0)
    b.add_argument("--window", type=float, default=5.0, help="attribution window during the bench (s)")
    b.add_argument("--broker-storage", choices=["memory", "s3"], default="memory",
                   help="stream: the embedded broker's log in memory or on its S3 object store (kept at a restart)")
    b.add_argument("--redis", choices=["single", "cluster"], default="single",
                   help="stream: one redis-server, or a local Redis Cluster of 3 masters and 3 replicas")
    b.add_argument("--catalog", type=Path, default=Path("data/sample_ads.jsonl"),
                   help="learn: the ad texts encoded; policies: the catalog beside the audience's ads")
    b.add_argument("--encoder", choices=["onnx-int8", "torch"], default=None, help="learn: encoder backend")
    b.add_argument("--ads", type=int, default=None, help="serve, learn: synthetic ads in the index (1000000); "
                   "policies: the audience's (200); cycle: the catalog's (2000)")
    b.add_argument("--requests", type=int, default=20_000, help="policies: requests served to each policy")
    b.add_argument("--seed", type=int, default=0, help="policies: the audience's and every policy's seed; "
                   "cycle: the synthetic world's and the learner's")
    b.add_argument("--policies", default=None, help="policies: which, comma-separated (default: all of "
                   "privads, random, popularity, river-thompson, vowpalwabbit)")
    b.add_argument("--plot", type=Path, default=None, help="policies: write the efficiency curves to this PNG")
    b.add_argument("--bid", type=_bid, default=None, metavar="B|catalog",
                   help="policies: the audience's ads' bid, or `catalog` (the default): drawn from --catalog's bids")
    b.add_argument("--label-delay", type=int, default=100,
                   help="policies: requests after which every policy gets what it showed and what was clicked")
    b.add_argument("--concurrency", type=int, default=2, help="serve: requests in flight (closed loop)")
    b.add_argument("--duration", type=float, default=30.0, help="serve: measured seconds per phase")
    b.add_argument("--warmup", type=float, default=5.0, help="serve: unmeasured seconds before each phase")
    b.add_argument("--api-workers", type=int, default=2, help="serve: API processes on the port (one per core)")
    b.add_argument("--impressions", type=int, default=1_000_000, help="cycle: archived impressions")
    b.add_argument("--days", type=float, default=14.0, help="cycle: days the archive spans, up to now")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # the services log what they do; the one-shot commands print their result, and a failure as one line
    quiet = args.command in ("produce", "replay", "export-logs", "lift", "topics", "simulate", "migrate-redis")
    progress.enable(not getattr(args, "quiet", True))  # the long commands, unless --quiet
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss's loader reports, at INFO, every SIMD build it probes before the dynamic-dispatch one it loads
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.command not in ("up", "worker", "learner", "api"):  # those handle SIGTERM themselves

        def _terminate(*_: object) -> None:
            raise SystemExit(143)  # unwinds, so `finally` blocks stop what the command started

        signal.signal(signal.SIGTERM, _terminate)
    try:
        settings = Settings()
        return args.fn(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line, non-zero, whatever went wrong
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"privads {args.command}: {msg}", file=sys.stderr)
        logging.getLogger("privads").debug("details", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
