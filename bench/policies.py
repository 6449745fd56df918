"""``privads bench policies``: the peers of ``bench.peers`` on one simulated audience, side by side.

Every policy answers the same requests: the same users in the same order
(seeded), k ads each, clicked by the audience's true model with common random
numbers (request i, position j uses the same uniform draw for every policy, so
two policies that show the same list get the same clicks). Efficiency is
``Σ(E[CTR] − random) / Σ(oracle − random)`` over the requests so far
(``bench.audience.efficiency``), from the true expected CTR of the lists shown,
not the sampled clicks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from privads.bench import optional
from privads.bench.audience import Audience, efficiency, make_audience
from privads.bench.peers import PopularityPeer, PrivAdsPolicy, RandomPolicy, RiverThompson, VowpalPolicy
from privads.infra.settings import Settings
from privads.ranker.policy import Policy, Slate, ThompsonParams
from privads.ranker.updates import UpdateParams

PEERS = ("privads", "random", "popularity", "river-thompson", "vowpalwabbit")


def ad_vectors(aud: Audience, settings: Settings) -> np.ndarray:
    """The audience's ads as the treatment serves them before any learner cycle: MiniLM, then the seeded projector."""
    from privads.ranker.encoder import AdEncoder
    from privads.ranker.projector import initial_projector

    x = AdEncoder(settings.encoder_backend, settings.models_dir / "encoder").encode(aud.ad_texts)
    return initial_projector(settings.d_ad, settings.d_user, settings.seed).project(x)


def check_policies(names: tuple[str, ...]) -> None:
    """Refuse an empty or unknown policy list, naming the first unknown one."""
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ValueError(f"policies: unknown policy {unknown[0]!r} (known: {', '.join(PEERS)})" if unknown
                         else "policies: none given")


def make_policies(names: tuple[str, ...], aud: Audience, vectors: np.ndarray, settings: Settings, seed: int,
                  negatives_after: int | None) -> list[Policy]:
    check_policies(names)
    n = len(aud.ad_ids)
    out: list[Policy] = []
    for name in names:
        if name == "privads":
            out.append(PrivAdsPolicy(vectors, aud.users, ThompsonParams.from_settings(settings),
                                     UpdateParams.from_settings(settings), settings.prior_precision, seed,
                                     negatives_after))
        elif name == "random":
            out.append(RandomPolicy(np.random.default_rng(seed)))
        elif name == "popularity":
            out.append(PopularityPeer(n, settings.base_rate, settings.popularity_prior_strength))
        elif name == "river-thompson":
            out.append(RiverThompson(seed))
        else:  # "vowpalwabbit", the last of PEERS
            out.append(VowpalPolicy(aud.ad_texts, seed))
    return out


def run_policies(aud: Audience, policies: list[Policy], requests: int, k: int, seed: int,
                 points: int = 40) -> dict[str, Any]:
    """Serve ``requests`` requests to every policy; the per-policy report and cumulative-efficiency curves."""
    rng = np.random.default_rng([seed, 7])
    users = rng.integers(aud.users, size=requests)
    uniforms = rng.random((requests, k))
    oracle = np.array([aud.oracle_ctr(int(u), k) for u in range(aud.users)])[users]
    random = np.array([aud.random_ctr(int(u), k) for u in range(aud.users)])[users]
    marks = np.unique(np.linspace(requests / points, requests, points).astype(int))
    ads, bids = np.arange(len(aud.ad_ids)), np.ones(len(aud.ad_ids))
    report: dict[str, Any] = {}
    for policy in policies:
        expected = np.zeros(requests)
        clicks = 0
        started = time.perf_counter()
        for i, u in enumerate(users.tolist()):
            slate = Slate(ads, u, bids=bids)
            ranked = policy.rank(slate, k)
            shown = ads[ranked.index]
            p = aud.click_probability(u, shown)
            clicked = uniforms[i, :shown.shape[0]] < p
            policy.learn(slate, ranked, clicked)
            expected[i] = p.mean()
            clicks += int(clicked.sum())
        seconds = time.perf_counter() - started
        q = requests // 4
        report[policy.name] = {
            "efficiency": round(efficiency(expected, oracle, random), 4),
            "efficiency_last_quarter": round(efficiency(expected[-q:], oracle[-q:], random[-q:]), 4),
            "expected_ctr": round(float(expected.mean()), 5), "clicks": clicks,
            "seconds": round(seconds, 1),
            "curve": [round(efficiency(expected[:m], oracle[:m], random[:m]), 4) for m in marks.tolist()]}
    return {"requests_at": marks.tolist(), "policies": report,
            "oracle_ctr": round(float(oracle.mean()), 5), "random_ctr": round(float(random.mean()), 5)}


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    """Cumulative efficiency against requests, one line per policy (PNG)."""
    optional("matplotlib").use("Agg")
    plt = optional("matplotlib.pyplot")

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for name, r in result["policies"].items():
        ax.plot(result["requests_at"], r["curve"], label=f"{name} ({r['efficiency']:.2f})", lw=2 if name ==
                "privads" else 1.3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("requests")
    ax.set_ylabel("cumulative efficiency (0 random, 1 oracle)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench_policies(settings: Settings, *, users: int, ads: int, requests: int, seed: int = 0, k: int = 10,
                   policies: tuple[str, ...] = PEERS, plot_path: Path | None = None,
                   negatives_after: int | None = None) -> dict[str, Any]:
    """The whole bench: audience, encoded ads, every policy, the JSON report (and the plot, if asked)."""
    if requests < 4 or not 1 <= k <= 100:
        raise ValueError("requests must be ≥ 4 and k in 1..100")
    check_policies(policies)  # before the encoder is loaded
    aud = make_audience(users, ads, seed=seed)
    vectors = ad_vectors(aud, settings)
    result = run_policies(aud, make_policies(policies, aud, vectors, settings, seed, negatives_after), requests, k,
                          seed)
    best = max(result["policies"], key=lambda n: result["policies"][n]["efficiency"])
    out = {"bench": "policies", "users": users, "ads": ads, "requests": requests, "k": k, "seed": seed,
           "privads_negatives": "at once" if negatives_after == 0 else "after the run" if negatives_after is None
           else f"{negatives_after} requests later", **result, "best": best}
    if plot_path is not None:
        plot(result, plot_path, f"{users} users, {ads} ads, k={k}, seed {seed}")
        out["plot"] = str(plot_path)
    return out
