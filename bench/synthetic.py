"""Simulated logged traffic with a known click model, for the ranker's bench and tests. Pure numpy.

The world (all seeded):

- ads: unit vectors around topic centres (a topic is also the ad's category), log-normal bids;
- users: one to three interests, each a topic centre plus noise; a user's affinity to
  an ad is the *best* match over the interests (multi-interest, which a single user
  vector can only average);
- requests carry a context (``device``, ``daypart``); each category does better on some
  devices and dayparts than others (an interaction table, as in real ad traffic);
- a click needs the slot examined (position bias ``(1 + pos)^-0.7``) and the ad liked:
  ``P(click) = exam(pos) · σ(c + α · affinity + ctx[device, cat] + ctx[daypart, cat])``;
- a click's value is the bid times a log-normal factor that depends on the category.

The user vectors the ranker sees are not the truth: they are what the stream's
own online update (``ranker.updates.update_many``) learns from each user's
earlier impressions, exactly as served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privads.learner.ranking import LabelledRows
from privads.ranker.features import build_rows, category_id, context_ids
from privads.ranker.updates import UpdateParams, sigmoid, update_many

DEVICES = ("mobile", "desktop", "tablet")
DAYPARTS = 4


@dataclass
class World:
    """Ground truth.

    Attributes
    ----------
    ads : ndarray, shape (A, D)
    bids : ndarray, shape (A,)
    topic : ndarray of int, shape (A,)
    interests : ndarray, shape (U, K, D)
    n_interests : ndarray of int, shape (U,)
    device_effect : ndarray, shape (len(DEVICES), T)
    daypart_effect : ndarray, shape (DAYPARTS, T)
    value_scale : ndarray, shape (T,)
    """

    ads: np.ndarray
    bids: np.ndarray
    topic: np.ndarray
    interests: np.ndarray
    n_interests: np.ndarray
    device_effect: np.ndarray
    daypart_effect: np.ndarray
    value_scale: np.ndarray
    offset: float = -3.2
    strength: float = 4.0

    def affinity(self, users: np.ndarray, ads: np.ndarray) -> np.ndarray:
        """Best match of each user's interests with each ad; users (n,), ads (n,) → (n,)."""
        sims = np.einsum("nkd,nd->nk", self.interests[users], self.ads[ads])
        k = np.arange(self.interests.shape[1])[None, :]
        return np.where(k < self.n_interests[users][:, None], sims, -np.inf).max(1)

    def click_prob(self, users: np.ndarray, ads: np.ndarray, position: np.ndarray,
                   device: np.ndarray, daypart: np.ndarray) -> np.ndarray:
        """True click probability of each row, shape (n,)."""
        t = self.topic[ads]
        z = (self.offset + self.strength * self.affinity(users, ads) + self.device_effect[device, t]
             + self.daypart_effect[daypart, t])
        return (1.0 + position) ** -0.7 * sigmoid(z)


def make_world(users: int, ads: int, d: int = 64, topics: int = 20, seed: int = 0) -> World:
    """A seeded world of ``users`` users and ``ads`` ads in ``d`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = rng.integers(0, topics, ads)
    a = centres[topic] + 0.6 * rng.standard_normal((ads, d)) / np.sqrt(d)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    k = 3
    it = centres[rng.integers(0, topics, (users, k))] + 0.5 * rng.standard_normal((users, k, d)) / np.sqrt(d)
    it /= np.linalg.norm(it, axis=2, keepdims=True)
    return World(
        ads=a.astype(np.float32), bids=np.exp(rng.normal(0.0, 0.5, ads)).astype(np.float32), topic=topic,
        interests=it.astype(np.float32), n_interests=rng.integers(1, k + 1, users),
        device_effect=rng.normal(0.0, 0.6, (len(DEVICES), topics)),
        daypart_effect=rng.normal(0.0, 0.6, (DAYPARTS, topics)),
        value_scale=np.exp(rng.normal(0.0, 0.5, topics)))


def learned_users(world: World, history: int, params: UpdateParams, prior_precision: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """User vectors as the stream would have learned them from ``history`` random impressions each.

    Returns
    -------
    mean : ndarray, shape (U, D)
    counts : ndarray of int, shape (U,)
    """
    rng = np.random.default_rng(seed)
    # typed: numpy's stub takes an untyped ``shape[0]`` for a scalar size and types ``counts`` as one number
    n_users: int = world.interests.shape[0]
    d: int = world.ads.shape[1]
    counts = rng.integers(1, 2 * history, n_users)  # some users are new, some well known
    user_index = np.repeat(np.arange(n_users), counts)
    rng.shuffle(user_index)
    ad_index = rng.integers(0, world.ads.shape[0], user_index.size)
    n = user_index.size
    p = world.click_prob(user_index, ad_index, rng.integers(0, 10, n), rng.integers(0, len(DEVICES), n),
                         rng.integers(0, DAYPARTS, n))
    clicked = (rng.random(n) < p).astype(np.float32)
    mean = np.zeros((n_users, d), np.float32)
    precision = np.full((n_users, d), prior_precision, np.float32)
    mean, _ = update_many(mean, precision, user_index, world.ads[ad_index], clicked, np.zeros(d, np.float32), params)
    return mean, counts


def context_tokens(device: np.ndarray, daypart: np.ndarray) -> np.ndarray:
    """Hashed context ids of each request (``ranker.features.context_ids`` of its context); shape (n, T)."""
    table = np.stack([[context_ids({"device": dev, "daypart": h}) for h in range(DAYPARTS)] for dev in DEVICES])
    return table[device, daypart]


def logged_traffic(world: World, users: np.ndarray, counts: np.ndarray, requests: int, *, k: int = 10,
                   candidates: int = 100, seed: int = 0) -> LabelledRows:
    """``requests`` logged requests of ``k`` ads each, in time order.

    The logging policy ranks a random candidate set by the learned ``u·p`` plus
    Gumbel noise (an exploring policy), so every kind of ad gets shown.
    """
    rng = np.random.default_rng(seed)
    n_users, n_ads = users.shape[0], world.ads.shape[0]
    who = rng.integers(0, n_users, requests)
    device = rng.integers(0, len(DEVICES), requests)
    daypart = rng.integers(0, DAYPARTS, requests)
    cand = rng.integers(0, n_ads, (requests, candidates))
    score = np.einsum("rd,rcd->rc", users[who], world.ads[cand]) + rng.gumbel(0, 0.3, cand.shape)
    top = np.take_along_axis(cand, np.argsort(-score, axis=1)[:, :k], axis=1)
    u_idx = np.repeat(who, k)
    a_idx = top.ravel()
    pos = np.tile(np.arange(k), requests)
    dev, day = np.repeat(device, k), np.repeat(daypart, k)
    p = world.click_prob(u_idx, a_idx, pos, dev, day)
    clicked = (rng.random(p.size) < p).astype(np.float32)
    value = np.where(clicked > 0, world.bids[a_idx] * world.value_scale[world.topic[a_idx]]
                     * np.exp(rng.normal(0, 0.3, p.size)), np.nan).astype(np.float32)
    cats = np.array([category_id(f"topic-{t}") for t in range(world.device_effect.shape[1])])
    rows = build_rows(users[u_idx], counts[u_idx], world.ads[a_idx], world.bids[a_idx], cats[world.topic[a_idx]],
                      context_tokens(dev, day), pos)
    return LabelledRows(rows, clicked, value, np.repeat(np.arange(requests), k))
