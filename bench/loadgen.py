"""Synthetic impression-and-click traffic, produced from its own process (used by ``privads bench stream``).

Run as ``python -m streams.loadgen SERVERS N USERS RATE SEED AD_IDS_FILE``; prints one JSON line with what it
sent. ``RATE`` 0 means as fast as possible. Clicks follow their impressions at a fixed CTR and carry
their send time as ``ts``, so the workers can measure click → user-state freshness.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import orjson

CTR = 0.05


def produce(servers: str, n: int, users: int, rate: float, seed: int, ad_ids: list[str]) -> dict:
    """Produce ``n`` events (impressions, and clicks for ~5% of them) over ``users`` users."""
    from confluent_kafka import Producer

    from privads.infra.kafka import rdkafka_config

    rng = np.random.default_rng(seed)
    # murmur2_random is Kafka's Java partitioner: the same partitions the API's impressions land on
    p = Producer(rdkafka_config(servers, **{"batch.num.messages": 10000, "queue.buffering.max.messages": 1_000_000}))
    n_imp = int(round(n / (1 + CTR)))
    user_of = rng.integers(0, users, n_imp)
    ad_of = rng.integers(0, len(ad_ids), n_imp)
    clicked = rng.random(n_imp) < CTR
    sent = clicks = 0
    start = time.time()
    pending: list[tuple[bytes, bytes]] = []
    for i in range(n_imp):
        if sent >= n:
            break
        now = time.time()
        if rate > 0:
            ahead = sent / rate - (now - start)
            if ahead > 0.001:
                time.sleep(ahead)
                now = time.time()
        user = f"user-{user_of[i]:06d}"
        key = user.encode()
        iid = f"imp-{seed}-{i}"
        p.produce("privads.impressions", key=key, value=orjson.dumps({
            "event_id": iid, "ts": now, "user_id": user, "ad_id": ad_ids[ad_of[i]], "position": int(i % 10),
            "propensity": 0.1, "policy": "treatment" if user_of[i] % 10 else "control", "model_version": None,
            "request_id": f"req-{seed}-{i // 10}"}))
        sent += 1
        if clicked[i]:
            pending.append((key, iid.encode()))
        # a click follows its impression a few hundred events later, like a user reading the page
        if pending and (len(pending) > 20 or i == n_imp - 1):
            for k, imp_id in pending:
                if sent >= n:
                    break
                p.produce("privads.clicks", key=k, value=orjson.dumps({
                    "event_id": "clk-" + imp_id.decode(), "ts": time.time(), "impression_id": imp_id.decode(),
                    "user_id": k.decode(), "ad_id": ad_ids[ad_of[int(imp_id.decode().rsplit("-", 1)[1])]]}))
                sent += 1
                clicks += 1
            pending.clear()
        if i % 10000 == 0:
            p.poll(0)
    left = p.flush(120)
    return {"events": sent, "impressions": sent - clicks, "clicks": clicks, "seconds": time.time() - start,
            "undelivered": left}


def main() -> None:
    servers, n, users, rate, seed, ads_file = sys.argv[1:7]
    ad_ids = json.loads(open(ads_file).read())
    print(json.dumps(produce(servers, int(n), int(users), float(rate), int(seed), ad_ids)), flush=True)


if __name__ == "__main__":
    main()
