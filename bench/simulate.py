"""``privads simulate``: a synthetic audience (``bench.audience``) driving a running API over HTTP.

It puts the audience's ads into the catalog with ``PUT /ads``, waits until they
are recommendable, then sends ``requests`` ``POST /recommend`` calls for
randomly chosen users (``concurrency`` in flight), samples each shown ad's
click from the true model and reports the clicks with ``POST /clicks``, the
way a client without Kafka would. Ads in the catalog that are not the
audience's (the sample catalog of ``make run``, say) are clicked at the base
rate: the audience does not care for them.

The report, per arm and per quarter of the run: requests, impressions, clicks,
CTR, the true expected CTR of what was shown, the oracle's and the random
policy's, and the efficiency ``(E[CTR] − random) / (oracle − random)``; then
``/lift`` at the end. The audience and the click draws are seeded; with more
than one request in flight the order of requests, and so what the API learns
when, is not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from privads.bench.audience import Audience, efficiency, make_audience


@dataclass
class Tally:
    """What one arm was shown, request by request."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    expected: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)
    random: list[float] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # the request's index in the run


def _summary(t: Tally, quarters: int, total: int) -> dict[str, Any]:
    e, o, r, idx = (np.asarray(x, dtype=np.float64) for x in (t.expected, t.oracle, t.random, t.order))
    out: dict[str, Any] = {
        "requests": t.requests, "impressions": t.impressions, "clicks": t.clicks,
        "ctr": t.clicks / t.impressions if t.impressions else None,
        "expected_ctr": float(e.mean()) if e.size else None, "oracle_ctr": float(o.mean()) if o.size else None,
        "random_ctr": float(r.mean()) if r.size else None, "efficiency": efficiency(e, o, r) if e.size else None,
        "efficiency_by_quarter": []}
    for q in range(quarters):
        m = (idx >= q * total / quarters) & (idx < (q + 1) * total / quarters)
        out["efficiency_by_quarter"].append(efficiency(e[m], o[m], r[m]) if m.any() else None)
    return out


async def _put_catalog(c: httpx.AsyncClient, aud: Audience, bid: float) -> None:
    for ad_id, text, topic in zip(aud.ad_ids, aud.ad_texts, aud.ad_topic.tolist(), strict=True):
        r = await c.put(f"/ads/{ad_id}", json={"text": text, "bid": bid, "category": aud.topics[topic]})
        if r.status_code != 200:
            raise RuntimeError(f"PUT /ads/{ad_id}: HTTP {r.status_code} {r.text[:200]}")


async def _wait_recommendable(c: httpx.AsyncClient, aud: Audience, timeout_s: float) -> None:
    """Until the audience's ads come back from /recommend (each was encoded and indexed)."""
    wanted = set(aud.ad_ids)
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    probe = 0
    while time.monotonic() < deadline:
        body = (await c.post("/recommend", json={"user_id": f"sim-probe-{probe}", "k": 100})).json()
        seen |= {a["ad_id"] for a in body.get("ads", [])} & wanted
        probe += 1
        model = (await c.get("/model")).json()
        if model["index"]["size"] >= len(wanted) and (len(seen) >= min(len(wanted), 50) or probe > 50):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the audience's ads were not recommendable after {timeout_s:.0f} s (saw {len(seen)})")


async def run_simulation(api: str, users: int, ads: int, requests: int, *, seed: int = 0, k: int = 10,
                         concurrency: int = 8, bid: float = 10.0, api_key: str | None = None,
                         quarters: int = 4, ready_timeout_s: float = 300.0) -> dict[str, Any]:
    """Drive the API at ``api`` with a seeded audience; returns the report."""
    if requests < 1 or concurrency < 1 or not 1 <= k <= 100:
        raise ValueError("requests and concurrency must be ≥ 1 and k in 1..100")
    aud = make_audience(users, ads, seed=seed)
    index = {a: i for i, a in enumerate(aud.ad_ids)}
    headers = {"X-API-Key": api_key} if api_key else {}
    tallies: dict[str, Tally] = {}
    failures = 0
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=api, timeout=30, headers=headers) as c:
        await _put_catalog(c, aud, bid)
        await _wait_recommendable(c, aud, ready_timeout_s)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker(w: int) -> None:
            nonlocal failures
            rng = np.random.default_rng([seed, w])
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                user = int(rng.integers(aud.users))
                r = await c.post("/recommend", json={"user_id": f"sim-{seed}-user-{user}", "k": k})
                if r.status_code != 200:
                    failures += 1
                    continue
                body = r.json()
                shown = body["ads"]
                known = np.array([index.get(a["ad_id"], -1) for a in shown], dtype=np.int64)
                p = aud.position_bias[:len(shown)] * np.where(
                    known >= 0, aud.base + aud.gain * aud.interest[user, aud.ad_topic[np.maximum(known, 0)]],
                    aud.base)
                clicked = rng.random(len(shown)) < p
                t = tallies.setdefault(body["policy"], Tally())
                t.requests += 1
                t.impressions += len(shown)
                t.clicks += int(clicked.sum())
                t.expected.append(float(p.mean()) if len(shown) else 0.0)
                t.oracle.append(aud.oracle_ctr(user, k))
                t.random.append(aud.random_ctr(user, k))
                t.order.append(i)
                for a in (a for a, hit in zip(shown, clicked, strict=True) if hit):
                    cr = await c.post("/clicks", json={"impression_id": a["impression_id"],
                                                       "user_id": f"sim-{seed}-user-{user}", "ad_id": a["ad_id"]})
                    failures += cr.status_code != 202

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.0)  # the last clicks reach the counters
        lift = (await c.get("/lift", params={"window": max(3600.0, elapsed + 600)})).json()
    return {"users": users, "ads": ads, "requests": requests, "k": k, "seed": seed, "concurrency": concurrency,
            "bid": bid, "seconds": round(elapsed, 1), "failed_calls": failures,
            "arms": {arm: _summary(t, quarters, requests) for arm, t in sorted(tallies.items())}, "lift": lift}
