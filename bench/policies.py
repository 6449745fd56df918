"""``privads bench policies``: the peers of ``bench.peers`` on one simulated world, side by side.

The world is ``privads simulate``'s with the sample catalog present: the
audience's ads (``bench.audience``), bidding like the catalog's (each bid drawn
from the catalog file's, or ``bid`` for all), beside the catalog's active ads at
their own bids, which the audience clicks at the base rate only. Every policy
ranks the same slate (every ad of the world, with its bid) for the same requests:
the same users in the same order (seeded), k ads each, clicked by the audience's
true model with common random numbers (request i, position j uses the same
uniform draw for every policy, so two policies that show the same list get the
same clicks). Every policy gets its labels on the same schedule: what it showed
and what was clicked, ``label_delay`` requests later (about half a second of
``privads simulate``'s traffic at the default 100).

Efficiency is ``Σ(E − random) / Σ(oracle − random)`` over the requests so far
(``bench.audience.efficiency``), from the true expected clicks and value of the
lists shown, not the sampled clicks: in clicks (oracle: the user's best
audience ads) and in value, clicks × bid, since ads are ranked by expected value
(oracle: the k best ads of the whole world by P(click) × bid). Random shows the
audience's ads uniformly. The last quarter's click efficiency is also split by
each request's user's strongest topic (``by_top_topic``): an average can hide a
whole audience segment a policy never learns.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privads.bench import optional
from privads.bench.audience import Audience, efficiency, make_audience
from privads.bench.peers import PopularityPeer, PrivAdsPolicy, RandomPolicy, RiverThompson, VowpalPolicy
from privads.bench.simulate import audience_bids, catalog_bids
from privads.infra import progress
from privads.infra.settings import Settings
from privads.ranker.policy import Policy, Slate, ThompsonParams
from privads.ranker.scoring import Ranked
from privads.ranker.updates import UpdateParams

PEERS = ("privads", "random", "popularity", "river-thompson", "vowpalwabbit")
LABEL_DELAY = 100


@dataclass(frozen=True)
class World:
    """Every ad a policy can show: the audience's (rows 0..M-1), then the catalog's.

    Attributes
    ----------
    audience : Audience
        With ``bids`` and the catalog's as ``other_bids``.
    texts : list of str, length M + O
    categories : list of str or None, length M + O
    vectors : ndarray, shape (M + O, D)
        The ads as the treatment serves them before any trained projector: MiniLM of each ad's category and
        text (``ranker.encoder.encoder_input``), then the initial
        projector fitted to the catalog's ads (``ranker.projector.initial_projector``).
    """

    audience: Audience
    texts: list[str]
    categories: list[str | None]
    vectors: np.ndarray

    @property
    def bids(self) -> np.ndarray:
        return self.audience.world_bids()


def _catalog_ads(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    ads = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [a for a in ads if a.get("active", True)]


def make_world(aud: Audience, settings: Settings, catalog: Path | None, bid: float | None, seed: int) -> World:
    """The audience at ordinary bids beside the catalog's ads, all encoded as the treatment serves them."""
    from privads.ranker.encoder import AdEncoder, encoder_input
    from privads.ranker.projector import initial_projector

    others = _catalog_ads(catalog)
    other_bids = catalog_bids(catalog)
    aud = aud.with_bids(audience_bids(len(aud.ad_ids), bid, other_bids, seed),
                        np.array([float(a["bid"]) for a in others]))
    texts = aud.ad_texts + [str(a["text"]) for a in others]
    categories: list[str | None] = [aud.topics[t] for t in aud.ad_topic.tolist()]
    categories += [a.get("category") for a in others]
    x = AdEncoder(settings.encoder_backend, settings.models_dir / "encoder").encode(
        [encoder_input(t, c) for t, c in zip(texts, categories, strict=True)])
    # the projector the first learner cycle fits to the catalog loaded before any user (the audience's ads not
    # among them: they come later, through PUT /ads)
    vectors = initial_projector(settings.d_ad, settings.d_user, settings.seed, x[len(aud.ad_ids):]).project(x)
    return World(aud, texts, categories, vectors)


def check_policies(names: tuple[str, ...]) -> None:
    """Refuse an empty or unknown policy list, naming the first unknown one."""
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ValueError(f"policies: unknown policy {unknown[0]!r} (known: {', '.join(PEERS)})" if unknown
                         else "policies: none given")


def make_policies(names: tuple[str, ...], world: World, settings: Settings, seed: int) -> list[Policy]:
    check_policies(names)
    out: list[Policy] = []
    for name in names:
        if name == "privads":
            out.append(PrivAdsPolicy(world.vectors, world.bids, world.categories, world.audience.users,
                                     ThompsonParams.from_settings(settings), UpdateParams.from_settings(settings),
                                     settings.prior_precision, seed,
                                     candidates=settings.candidates, category_strength=settings.category_strength,
                                     rekey_tolerance=settings.rekey_tolerance,
                                     taste_strength=settings.tastes, taste_window=settings.taste_window))
        elif name == "random":
            out.append(RandomPolicy(np.random.default_rng(seed)))
        elif name == "popularity":
            out.append(PopularityPeer(len(world.texts), settings.base_rate, settings.popularity_prior_strength))
        elif name == "river-thompson":
            out.append(RiverThompson(seed))
        else:  # "vowpalwabbit", the last of PEERS
            out.append(VowpalPolicy(world.texts, seed, categories=world.categories))
    return out


def run_policies(world: World, policies: list[Policy], requests: int, k: int, seed: int, points: int = 40,
                 label_delay: int = LABEL_DELAY) -> dict[str, Any]:
    """Serve ``requests`` requests to every policy; the per-policy report and cumulative-efficiency curves."""
    aud = world.audience
    rng = np.random.default_rng([seed, 7])
    users = rng.integers(aud.users, size=requests)
    uniforms = rng.random((requests, k))
    per_user = np.array([[aud.oracle_ctr(u, k), aud.random_ctr(u, k), aud.oracle_value(u, k), aud.random_value(u, k)]
                         for u in range(aud.users)])[users]
    oracle, random, oracle_value, random_value = per_user.T
    top_topic = aud.interest.argmax(axis=1)[users]  # each request's user's strongest topic
    marks = np.unique(np.linspace(requests / points, requests, points).astype(int))
    ads, bids = np.arange(len(world.texts)), world.bids
    report: dict[str, Any] = {}
    q = requests // 4
    for policy in policies:
        expected, value = np.zeros(requests), np.zeros(requests)
        clicks = 0
        waiting: deque[tuple[int, Slate, Ranked, np.ndarray]] = deque()  # labels not delivered yet
        started = time.perf_counter()
        bar = progress.bar(f"bench policies: {policy.name}", total=requests, unit="req")
        for i, u in enumerate(users.tolist()):
            bar.update(1)
            slate = Slate(ads, u, bids=bids)
            ranked = policy.rank(slate, k)
            shown = ads[ranked.index]
            p = aud.click_probability(u, shown)
            clicked = uniforms[i, :shown.shape[0]] < p
            waiting.append((i + label_delay, slate, ranked, clicked))
            while waiting and waiting[0][0] <= i:
                _, was, did, hit = waiting.popleft()
                policy.learn(was, did, hit)
            expected[i], value[i] = p.mean(), float((p * bids[shown]).sum()) / k
            clicks += int(clicked.sum())
        bar.close()
        seconds = time.perf_counter() - started
        report[policy.name] = {
            "efficiency": round(efficiency(expected, oracle, random), 4),
            "efficiency_last_quarter": round(efficiency(expected[-q:], oracle[-q:], random[-q:]), 4),
            "value_efficiency": round(efficiency(value, oracle_value, random_value), 4),
            "value_efficiency_last_quarter": round(efficiency(value[-q:], oracle_value[-q:], random_value[-q:]), 4),
            "by_top_topic": by_top_topic(aud.topics, top_topic[-q:], expected[-q:], oracle[-q:], random[-q:]),
            "expected_ctr": round(float(expected.mean()), 5), "clicks": clicks,
            "seconds": round(seconds, 1),
            "curve": [round(efficiency(expected[:m], oracle[:m], random[:m]), 4) for m in marks.tolist()],
            "value_curve": [round(efficiency(value[:m], oracle_value[:m], random_value[:m]), 4)
                            for m in marks.tolist()]}
    return {"requests_at": marks.tolist(), "policies": report, "label_delay": label_delay,
            "oracle_ctr": round(float(oracle.mean()), 5), "random_ctr": round(float(random.mean()), 5),
            "oracle_value": round(float(oracle_value.mean()), 5), "random_value": round(float(random_value.mean()), 5)}


def by_top_topic(topics: list[str], top: np.ndarray, expected: np.ndarray, oracle: np.ndarray,
                 random: np.ndarray) -> dict[str, dict[str, float | int]]:
    """Click efficiency of the requests whose user's strongest topic is each topic.

    Parameters
    ----------
    topics : list of str, length T
    top : ndarray of int, shape (n,)
        Each request's user's strongest topic.
    expected, oracle, random : ndarray, shape (n,)
        Each request's true expected CTR under the policy, the oracle and random.

    Returns
    -------
    dict
        Topic → its requests, its share of ``Σ(oracle − random)`` (how much of the
        efficiency it can move) and its efficiency; topics with no request are left out.
    """
    span = float(np.sum(oracle - random))
    out: dict[str, dict[str, float | int]] = {}
    for t, name in enumerate(topics):
        m = top == t
        if m.any():
            out[name] = {"requests": int(m.sum()),
                         "span_share": round(float(np.sum(oracle[m] - random[m])) / span, 4) if span > 0 else 0.0,
                         "efficiency": round(efficiency(expected[m], oracle[m], random[m]), 4)}
    return out


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    """Cumulative efficiency against requests, one line per policy (PNG)."""
    optional("matplotlib").use("Agg")
    plt = optional("matplotlib.pyplot")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for ax, (curve, total, what) in zip(axes, (("curve", "efficiency", "clicks"),
                                               ("value_curve", "value_efficiency", "value (clicks × bid)")),
                                        strict=True):
        for name, r in result["policies"].items():
            ax.plot(result["requests_at"], r[curve], label=f"{name} ({r[total]:.2f})", lw=2 if name == "privads"
                    else 1.3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("requests")
        ax.set_title(f"{what}: {title}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative efficiency (0 random, 1 oracle)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench_policies(settings: Settings, *, users: int, ads: int, requests: int, seed: int = 0, k: int = 10,
                   policies: tuple[str, ...] = PEERS, plot_path: Path | None = None,
                   bid: float | None = None,
                   label_delay: int = LABEL_DELAY, catalog: Path | None = None) -> dict[str, Any]:
    """The whole bench: the world, every policy, the JSON report (and the plot, if asked).

    ``catalog``: the ads beside the audience's (None: ``settings.catalog``, the sample
    catalog by default); ``bid`` fixes the audience's bids (None: drawn like the catalog's).
    """
    catalog = catalog if catalog is not None else settings.catalog
    if requests < 4 or not 1 <= k <= 100 or label_delay < 0:
        raise ValueError("requests must be ≥ 4, k in 1..100 and label-delay ≥ 0")
    check_policies(policies)  # before the encoder is loaded
    world = make_world(make_audience(users, ads, seed=seed), settings, catalog, bid, seed)
    result = run_policies(world, make_policies(policies, world, settings, seed), requests, k, seed,
                          label_delay=label_delay)
    best = max(result["policies"], key=lambda n: result["policies"][n]["value_efficiency"])
    b, ob = world.audience.bids, world.audience.other_bids
    spread = (lambda x: {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max())}  # noqa: E731
              if x.size else None)
    out = {"bench": "policies", "users": users, "ads": ads, "requests": requests, "k": k, "seed": seed,
           "world": {"audience_ads": len(b), "catalog_ads": len(ob), "catalog": str(catalog),
                     "bid": bid if bid is not None else "catalog", "audience_bids": spread(b),
                     "catalog_bids": spread(ob)},
           "privads_negatives": f"fast: with its impressions, {label_delay} requests after serving",
           **result, "best": best}
    if plot_path is not None:
        plot(result, plot_path, f"{users} users, {ads} ads + {len(ob)} catalog ads, k={k}, seed {seed}")
        out["plot"] = str(plot_path)
    return out
