"""``privads simulate``: a synthetic audience (``bench.audience``) driving a running API over HTTP.

It puts the audience's ads into the catalog with ``PUT /ads``, waits until they
are recommendable, then sends ``requests`` ``POST /recommend`` calls for
randomly chosen users (``concurrency`` in flight), samples each shown ad's
click from the true model and reports the clicks with ``POST /clicks``, the
way a client without Kafka would. Ads in the catalog that are not the
audience's (the sample catalog of ``make run``, say) are clicked at the base
rate: the audience does not care for them.

The audience's ads bid like the catalog's (each drawn from the catalog file's
bids; 1.0 without one) unless ``bid`` fixes one bid for all: never above the
catalog to make them win. The catalog file also gives the other ads' bids, so
that the value oracle (the k best ads of the whole world by P(click) × bid)
and the value of what was shown are known.

With ``context`` the requests carry a device and a daypart that scale each topic's
interest (``bench.audience.make_audience``): an effect of the request that the users'
vectors cannot hold and a ranker that reads the context can learn.

The report, per arm and per quarter of the run: requests, impressions, clicks,
CTR, the true expected CTR and value of what was shown, the oracle's and the
random policy's, and the efficiency ``(E − random) / (oracle − random)`` in
clicks and in value; then ``/lift`` at the end. The audience, its bids and the
click draws are seeded; with more than one request in flight the order of
requests, and so what the API learns when, is not.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from privads.bench.audience import Audience, draw_bids, efficiency, make_audience
from privads.infra import progress


@dataclass
class Tally:
    """What one arm was shown, request by request."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    expected: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)
    random: list[float] = field(default_factory=list)
    value: list[float] = field(default_factory=list)  # expected value per slot: Σ P(click) × bid / k
    oracle_value: list[float] = field(default_factory=list)
    random_value: list[float] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # the request's index in the run


def _by_quarter(e: np.ndarray, o: np.ndarray, r: np.ndarray, idx: np.ndarray, quarters: int,
                total: int) -> list[float | None]:
    out: list[float | None] = []
    for q in range(quarters):
        m = (idx >= q * total / quarters) & (idx < (q + 1) * total / quarters)
        out.append(efficiency(e[m], o[m], r[m]) if m.any() else None)
    return out


def _summary(t: Tally, quarters: int, total: int) -> dict[str, Any]:
    e, o, r, v, ov, rv, idx = (np.asarray(x, dtype=np.float64) for x in (
        t.expected, t.oracle, t.random, t.value, t.oracle_value, t.random_value, t.order))
    mean = (lambda x: float(x.mean()) if x.size else None)  # noqa: E731
    return {
        "requests": t.requests, "impressions": t.impressions, "clicks": t.clicks,
        "ctr": t.clicks / t.impressions if t.impressions else None,
        "expected_ctr": mean(e), "oracle_ctr": mean(o), "random_ctr": mean(r),
        "efficiency": efficiency(e, o, r) if e.size else None,
        "efficiency_by_quarter": _by_quarter(e, o, r, idx, quarters, total),
        "expected_value": mean(v), "oracle_value": mean(ov), "random_value": mean(rv),
        "value_efficiency": efficiency(v, ov, rv) if v.size else None,
        "value_efficiency_by_quarter": _by_quarter(v, ov, rv, idx, quarters, total)}


def catalog_bids(path: Path | None) -> dict[str, float]:
    """Ad id → bid of the catalog file's active ads (JSON lines; empty without a file)."""
    if path is None:
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ad = json.loads(line)
            if ad.get("active", True):
                out[str(ad["ad_id"])] = float(ad["bid"])
    return out


def audience_bids(n: int, bid: float | None, catalog: dict[str, float], seed: int) -> np.ndarray:
    """The audience's ads' bids: ``bid`` each, or drawn from the catalog's bids (1.0 without a catalog)."""
    if bid is not None:
        return np.full(n, float(bid))
    return draw_bids(np.fromiter(catalog.values(), np.float64, len(catalog)), n, np.random.default_rng([seed, 11]))


async def _put_catalog(c: httpx.AsyncClient, aud: Audience) -> None:
    for ad_id, text, topic, bid in zip(aud.ad_ids, aud.ad_texts, aud.ad_topic.tolist(), aud.bids.tolist(),
                                       strict=True):
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
                         concurrency: int = 8, bid: float | None = None, catalog: Path | None = None,
                         api_key: str | None = None, quarters: int = 4,
                         ready_timeout_s: float = 300.0, context: float = 0.0) -> dict[str, Any]:
    """Drive the API at ``api`` with a seeded audience; returns the report.

    ``bid``: the audience's ads' bid, or None to draw each like ``catalog``'s (the
    sample catalog file the stack loaded; None: no catalog, bids 1.0). ``context``:
    the strength of the request context's effect (``make_audience``'s
    ``context_strength``); above 0 each request sends a device and a daypart drawn
    uniformly, and the truth, the oracle and the random policy are those of that context.
    """
    if requests < 1 or concurrency < 1 or not 1 <= k <= 100:
        raise ValueError("requests and concurrency must be ≥ 1 and k in 1..100")
    if not 0.0 <= context <= 3.0:
        raise ValueError(f"context: the effect's strength must be in [0, 3], got {context}")
    others = catalog_bids(catalog)
    base = make_audience(users, ads, seed=seed, context_strength=context)
    aud = base.with_bids(audience_bids(ads, bid, others, seed), np.fromiter(others.values(), np.float64, len(others)))
    index = {a: i for i, a in enumerate(aud.ad_ids)}
    unknown = 0  # impressions of ads neither the audience's nor the catalog file's: value counted at bid 0
    headers = {"X-API-Key": api_key} if api_key else {}
    tallies: dict[str, Tally] = {}
    failures = 0
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=api, timeout=30, headers=headers) as c:
        progress.stage(f"simulate: putting the audience's {ads} ads into the catalog (PUT /ads)")
        await _put_catalog(c, aud)
        progress.stage("simulate: waiting until /recommend serves them")
        await _wait_recommendable(c, aud, ready_timeout_s)
        bar = progress.bar("simulate: requests", total=requests, unit="req")
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker(w: int) -> None:
            nonlocal failures, unknown
            rng = np.random.default_rng([seed, w])
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                user = int(rng.integers(aud.users))
                ctx = int(rng.integers(len(aud.contexts))) if aud.contexts else None
                body_in: dict[str, Any] = {"user_id": f"sim-{seed}-user-{user}", "k": k}
                if ctx is not None:
                    body_in["context"] = aud.contexts[ctx]
                r = await c.post("/recommend", json=body_in)
                bar.update(1)
                if r.status_code != 200:
                    failures += 1
                    continue
                body = r.json()
                shown = body["ads"]
                known = np.array([index.get(a["ad_id"], -1) for a in shown], dtype=np.int64)
                # an ad neither the audience's nor the catalog's is clicked at the base rate, like the catalog's
                p = aud.click_probability(user, np.where(known >= 0, known, len(aud.ad_ids)), ctx)
                other = np.array([others.get(a["ad_id"], np.nan) for a in shown], dtype=np.float64)
                unknown += int(((known < 0) & np.isnan(other)).sum())
                bids = np.where(known >= 0, aud.bids[np.maximum(known, 0)], np.nan_to_num(other))
                clicked = rng.random(len(shown)) < p
                t = tallies.setdefault(body["policy"], Tally())
                t.requests += 1
                t.impressions += len(shown)
                t.clicks += int(clicked.sum())
                t.expected.append(float(p.mean()) if len(shown) else 0.0)
                t.oracle.append(aud.oracle_ctr(user, k, ctx))
                t.random.append(aud.random_ctr(user, k, ctx))
                t.value.append(float((p * bids).sum() / k))
                t.oracle_value.append(aud.oracle_value(user, k, ctx))
                t.random_value.append(aud.random_value(user, k, ctx))
                t.order.append(i)
                for a, worth in ((a, v) for a, v, hit in zip(shown, bids, clicked, strict=True) if hit):
                    # a click is worth its ad's bid (cost per click): /lift's value per impression is the revenue
                    cr = await c.post("/clicks", json={"impression_id": a["impression_id"], "value": float(worth),
                                                       "user_id": f"sim-{seed}-user-{user}", "ad_id": a["ad_id"]})
                    failures += cr.status_code != 202
                bar.set_postfix(clicks=sum(t.clicks for t in tallies.values()), refresh=False)

        with bar:
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.0)  # the last clicks reach the counters
        lift = (await c.get("/lift", params={"window": max(3600.0, elapsed + 600)})).json()
    b = aud.bids
    return {"users": users, "ads": ads, "requests": requests, "k": k, "seed": seed, "concurrency": concurrency,
            "bid": bid if bid is not None else "catalog", "context": context,
            "bids": {"min": float(b.min()), "median": float(np.median(b)), "max": float(b.max())},
            "catalog_ads": len(others), "catalog_max_bid": max(others.values()) if others else None,
            "unknown_bid_impressions": unknown, "seconds": round(elapsed, 1), "failed_calls": failures,
            "arms": {arm: _summary(t, quarters, requests) for arm, t in sorted(tallies.items())}, "lift": lift}
