"""A synthetic audience with a known click model, for ``privads simulate`` and ``privads bench policies``. Pure.

Ads belong to topics and their texts are written from the topic's vocabulary
("waterproof hiking boots for families"), so the real encoder has to discover
the topics from the words. Users have latent interests over the topics
(sparse, Dirichlet). A user clicks an ad at position ``j`` with probability

    P(click) = position_bias[j] · (base + gain · interest[user, topic(ad)])

which is the ground truth: the oracle shows each user the ads of their
strongest topics, in that order; the random policy shows k of the audience's ads
uniformly. A policy's *efficiency* on a request is ``(E[CTR] − random) /
(oracle − random)`` where E[CTR] is the true expected click rate of the list it
showed (not the sampled clicks): 0 is no better than random, 1 is the oracle.

Ads are ranked by expected value, so the audience's ads have bids too (``bids``;
``draw_bids`` draws them like a catalog's), and the world may hold ads that are
not the audience's (a catalog's, ``other_bids``), which it clicks at the base
rate only. *Value* efficiency is the same ratio in expected value per request
(Σ P(click) × bid): the value oracle picks the k best of every ad in the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "hiking": (["hiking boots", "trail backpack", "camping tent", "trekking poles", "rain jacket", "sleeping bag",
                "head torch", "water filter"], ["waterproof", "lightweight", "insulated", "rugged"]),
    "coffee": (["espresso machine", "coffee grinder", "single-origin beans", "pour-over kettle", "french press",
                "cold brew kit", "milk frother", "coffee subscription"], ["organic", "fair-trade", "barista-grade",
                                                                          "freshly roasted"]),
    "gaming": (["gaming laptop", "mechanical keyboard", "wireless headset", "game controller", "curved monitor",
                "gaming chair", "graphics card", "streaming microphone"], ["low-latency", "rgb", "ergonomic",
                                                                          "high refresh rate"]),
    "fitness": (["yoga mat", "adjustable dumbbells", "running shoes", "fitness tracker", "protein powder",
                 "resistance bands", "spin bike", "gym membership"], ["breathable", "compact", "pro-grade",
                                                                      "home workout"]),
    "travel": (["carry-on suitcase", "city break package", "beach resort deal", "travel pillow", "rail pass",
                "ski holiday", "cruise cabin", "airport lounge pass"], ["last-minute", "all-inclusive",
                                                                        "family-friendly", "luxury"]),
    "kids": (["wooden toy train", "picture books", "kids bicycle", "building blocks", "baby stroller",
              "school backpack", "crayon set", "bunk bed"], ["educational", "non-toxic", "colourful", "safe"]),
    "insurance": (["car insurance", "home insurance", "travel insurance", "pet insurance", "life insurance",
                   "health plan", "bike insurance", "renters insurance"], ["low-cost", "comprehensive", "instant",
                                                                           "no-claims bonus"]),
    "cooking": (["cast iron skillet", "chef knife", "stand mixer", "spice set", "non-stick pan", "meal kit",
                 "pizza oven", "rice cooker"], ["professional", "dishwasher-safe", "artisan", "quick"]),
    "finance": (["savings account", "credit card", "investment app", "mortgage advice", "budgeting tool",
                 "retirement plan", "stock trading", "currency exchange"], ["zero-fee", "high-interest",
                                                                            "secure", "award-winning"]),
    "pets": (["dog food", "cat tree", "pet bed", "chew toys", "aquarium kit", "bird cage", "dog leash",
              "litter box"], ["grain-free", "vet-approved", "washable", "durable"]),
}
SUFFIXES = ["for families", "for beginners", "for professionals", "for weekends", "on sale", "with free delivery",
            "made locally", "best seller"]


@dataclass(frozen=True)
class Audience:
    """Ads, users and the true click model.

    Attributes
    ----------
    topics : list of str, length T
    ad_ids, ad_texts : list of str, length M
    ad_topic : ndarray of int, shape (M,)
    interest : ndarray, shape (N, T)
        Each user's interest per topic, in [0, 1], rows summing to 1.
    position_bias : ndarray, shape (K,)
    base, gain : float
    bids : ndarray, shape (M,)
        The audience's ads' bids.
    other_bids : ndarray, shape (O,)
        Bids of the world's other ads (clicked at ``base`` only).
    contexts : list of dict, length C
        The request contexts a client sends (device × daypart); empty: no context.
    context_effect : ndarray, shape (C, T)
        How much context c scales the interest in topic t (mean 1 over the contexts):
        an effect of the request, not of the user, which a user vector cannot hold and
        a ranker with the context among its features can learn.
    """

    topics: list[str]
    ad_ids: list[str]
    ad_texts: list[str]
    ad_topic: np.ndarray
    interest: np.ndarray
    position_bias: np.ndarray
    base: float
    gain: float
    bids: np.ndarray = field(default_factory=lambda: np.zeros(0))
    other_bids: np.ndarray = field(default_factory=lambda: np.zeros(0))
    contexts: list[dict[str, str]] = field(default_factory=list)
    context_effect: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def __post_init__(self) -> None:
        if self.bids.size == 0:  # no bids given: every ad bids 1
            object.__setattr__(self, "bids", np.ones(len(self.ad_ids)))
        if self.bids.shape != (len(self.ad_ids),) or (self.bids < 0).any():
            raise ValueError(f"bids: expected {len(self.ad_ids)} bids ≥ 0, got shape {self.bids.shape}")

    def with_bids(self, bids: np.ndarray, other_bids: np.ndarray | None = None) -> Audience:
        """The same audience with its ads at ``bids``, beside other ads at ``other_bids``."""
        return replace(self, bids=np.asarray(bids, np.float64),
                       other_bids=np.zeros(0) if other_bids is None else np.asarray(other_bids, np.float64))

    @property
    def users(self) -> int:
        return int(self.interest.shape[0])

    def ctr(self, user: int, context: int | None = None) -> np.ndarray:
        """True P(click) at the top position of each of the audience's ads for ``user``, shape (M,)."""
        interest = self.interest[user, self.ad_topic]
        if context is not None and self.contexts:
            interest = interest * self.context_effect[context, self.ad_topic]
        return np.minimum(self.base + self.gain * interest, 1.0)

    def click_probability(self, user: int, ads: np.ndarray, context: int | None = None) -> np.ndarray:
        """True P(click) of ``ads`` (indices, shape (k,)) shown at positions 0..k-1 to ``user``.

        Indices from ``len(ad_ids)`` on are the world's other ads (``other_bids``' order): the base rate.
        """
        k = ads.shape[0]
        mine = ads < len(self.ad_ids)
        return self.position_bias[:k] * np.where(mine, self.ctr(user, context)[np.where(mine, ads, 0)], self.base)

    def world_bids(self) -> np.ndarray:
        """Every ad's bid, the audience's then the others', shape (M + O,)."""
        return np.concatenate([self.bids, self.other_bids])

    def oracle_ctr(self, user: int, k: int, context: int | None = None) -> float:
        """The best possible expected CTR of a k-list for ``user``: ads by interest, strongest at the top."""
        best = np.sort(self.ctr(user, context))[::-1][:k]
        return float(np.mean(self.position_bias[:k] * best))

    def random_ctr(self, user: int, k: int, context: int | None = None) -> float:
        """The expected CTR of k ads drawn uniformly, for ``user``."""
        return float(np.mean(self.position_bias[:k]) * np.mean(self.ctr(user, context)))

    def oracle_value(self, user: int, k: int, context: int | None = None) -> float:
        """The best expected value per slot of a k-list: the world's k best ads by P(click) × bid, best on top."""
        mine = self.ctr(user, context) * self.bids
        best = np.sort(np.concatenate([mine, self.base * self.other_bids]))[::-1][:k]
        return float(np.mean(self.position_bias[:best.shape[0]] * best))

    def random_value(self, user: int, k: int, context: int | None = None) -> float:
        """The expected value per slot of k of the audience's ads drawn uniformly."""
        return float(np.mean(self.position_bias[:k]) * np.mean(self.ctr(user, context) * self.bids))


DEVICES = ("mobile", "desktop")
DAYPARTS = ("morning", "evening")


def make_audience(users: int, ads: int, *, seed: int = 0, concentration: float = 0.3, base: float = 0.01,
                  gain: float = 0.4, positions: int = 100, topics: int | None = None,
                  context_strength: float = 0.0) -> Audience:
    """A seeded audience of ``users`` users and ``ads`` ads (texts from ``TOPICS``' vocabularies).

    ``context_strength`` > 0 adds request contexts (device × daypart) that scale each
    topic's interest by ``exp(strength · z)``, z standard normal per (context, topic),
    normalised to mean 1 over the contexts; 0 leaves the world without context (and the
    same as before it existed, for a seed).
    """
    if users < 1 or ads < 1:
        raise ValueError("users and ads must be at least 1")
    rng = np.random.default_rng(seed)
    names = list(TOPICS)[: topics or len(TOPICS)]
    ad_topic = np.arange(ads) % len(names)
    rng.shuffle(ad_topic)
    texts, seen = [], set()
    for i, t in enumerate(ad_topic):
        nouns, adjectives = TOPICS[names[t]]
        for _ in range(100):
            text = f"{rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(SUFFIXES)}"
            if text not in seen:
                break
        else:
            text = f"{text} #{i}"
        seen.add(text)
        texts.append(text)
    interest = rng.dirichlet(np.full(len(names), concentration), users)
    bias = 1.0 / (1.0 + np.arange(positions)) ** 0.5
    contexts: list[dict[str, str]] = []
    effect = np.zeros((0, 0))
    if context_strength > 0:  # its own stream: the rest of the world is the same as without context
        contexts = [{"device": d, "daypart": p} for d in DEVICES for p in DAYPARTS]
        effect = np.exp(context_strength * np.random.default_rng([seed, 17]).standard_normal((len(contexts),
                                                                                             len(names))))
        effect /= effect.mean(axis=0, keepdims=True)
    return Audience(names, [f"sim-ad-{seed}-{i:04d}" for i in range(ads)], texts, ad_topic, interest, bias, base,
                    gain, contexts=contexts, context_effect=effect)


def draw_bids(catalog_bids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` bids drawn like a catalog's: with replacement from its bids (1.0 each when it has none)."""
    if catalog_bids.size == 0:
        return np.ones(n)
    return rng.choice(np.asarray(catalog_bids, np.float64), size=n, replace=True)


def efficiency(ctr: np.ndarray, oracle: np.ndarray, random: np.ndarray) -> float:
    """Σ(E[CTR] − random) / Σ(oracle − random) over requests (a ratio of sums: heavy users weigh more)."""
    span = float(np.sum(oracle - random))
    return float(np.sum(ctr - random) / span) if span > 0 else float("nan")
