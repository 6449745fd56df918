"""The policies ``privads bench policies`` puts side by side on one simulated audience.

Each policy answers ``rank(user, k)`` with ad indices, best first, and learns
from ``learn(user, ads, clicked)`` after the audience has reacted. All of them
see the same requests (the same users in the same order) and the same click
model (``bench.audience``); each is seeded.

- ``PrivAdsPolicy`` — what the treatment arm serves, in process: the projected
  MiniLM vectors of the ad texts, the user posteriors of ``ranker.updates``,
  ``ranker.policy.thompson_policy`` with the per-ad calibration factors, the
  stream's counting (an impression counts as shown, with the pCTR it was served
  at, as soon as it is served; a click updates the user at once). Negatives
  reach the user vectors only when their attribution window closes, as in the
  live stream: ``negatives_after`` requests later (``None``: after the run).
- ``RandomPolicy`` — k ads uniformly.
- ``PopularityPolicy`` — the popularity control of ``/recommend``.
- ``RiverThompson`` — river's ``bandit.ThompsonSampling`` with Beta rewards, one
  arm per ad, non-contextual; a list is k pulls without replacement.
- ``VowpalPolicy`` — Vowpal Wabbit's ``--cb_explore_adf`` (SquareCB exploration)
  with the user id as the shared feature, each ad's id and text words as its
  action features and their interactions (``-q UA``); a list is k draws without
  replacement from its action distribution; every shown ad is one bandit example.

The figures compare policies, not systems: no network, no broker, labels at
once for every peer.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np

from privads.ranker.policy import ThompsonParams, popularity_order, thompson_policy
from privads.ranker.updates import UpdateParams, update_many


class Policy(Protocol):
    name: str

    def rank(self, user: int, k: int) -> np.ndarray: ...

    def learn(self, user: int, ads: np.ndarray, clicked: np.ndarray) -> None: ...


class RandomPolicy:
    name = "random"

    def __init__(self, n_ads: int, seed: int) -> None:
        self.n = n_ads
        self.rng = np.random.default_rng(seed)

    def rank(self, user: int, k: int) -> np.ndarray:
        return self.rng.choice(self.n, size=min(k, self.n), replace=False)

    def learn(self, user: int, ads: np.ndarray, clicked: np.ndarray) -> None:
        return None


class PopularityPolicy:
    """The control arm's ranking: posterior-mean CTR × bid from its own clicks and impressions."""

    name = "popularity"

    def __init__(self, bids: np.ndarray, prior_ctr: float, strength: float) -> None:
        self.bids = bids
        self.clicks = np.zeros(bids.shape[0], np.int64)
        self.shown = np.zeros(bids.shape[0], np.int64)
        self.active = np.ones(bids.shape[0], bool)
        self.prior, self.strength = prior_ctr, strength

    def rank(self, user: int, k: int) -> np.ndarray:
        rows, _ = popularity_order(self.clicks, self.shown, self.bids, self.active, self.prior, self.strength, k)
        return rows

    def learn(self, user: int, ads: np.ndarray, clicked: np.ndarray) -> None:
        self.shown[ads] += 1
        self.clicks[ads] += clicked.astype(np.int64)


class PrivAdsPolicy:
    """The treatment arm's policy and online learning, in process (see the module docstring)."""

    name = "privads"

    def __init__(self, vectors: np.ndarray, bids: np.ndarray, users: int, thompson: ThompsonParams,
                 update: UpdateParams, prior_precision: float, seed: int, negatives_after: int | None = None) -> None:
        n, d = vectors.shape
        self.vectors, self.bids = vectors, bids
        self.categories = np.zeros(n, np.int64)
        self.mean = np.zeros((users, d), np.float32)
        self.precision = np.full((users, d), prior_precision, np.float32)
        self.count = np.zeros(users, np.int64)
        self.prior = np.zeros(d, np.float32)
        self.clicks = np.zeros(n, np.int64)
        self.expected = np.zeros(n, np.float64)
        self.thompson, self.update = thompson, update
        self.rng = np.random.default_rng(seed)
        self.negatives_after = negatives_after
        self.waiting: deque[tuple[int, int, int]] = deque()  # (due request, user, ad) of unclicked impressions
        self.requests = 0
        self._pctr: dict[int, np.ndarray] = {}

    def rank(self, user: int, k: int) -> np.ndarray:
        r = thompson_policy(self.mean[user], self.precision[user], int(self.count[user]), self.vectors, self.bids,
                            self.categories, [], None, self.clicks, self.expected, k, self.thompson, self.rng)
        self._pctr[user] = r.pctr
        return r.index

    def learn(self, user: int, ads: np.ndarray, clicked: np.ndarray) -> None:
        self.requests += 1
        pctr = self._pctr.pop(user)
        self.expected[ads] += pctr
        self.clicks[ads] += clicked.astype(np.int64)
        users, shown, labels = [user] * int(clicked.sum()), list(ads[clicked]), [1.0] * int(clicked.sum())
        if self.negatives_after is not None:
            self.waiting.extend((self.requests + self.negatives_after, user, int(a)) for a in ads[~clicked])
            while self.waiting and self.waiting[0][0] <= self.requests:
                _, u, a = self.waiting.popleft()
                users.append(u)
                shown.append(a)
                labels.append(0.0)
        if users:
            self._apply(np.asarray(users), np.asarray(shown, np.int64), np.asarray(labels))

    def _apply(self, users: np.ndarray, ads: np.ndarray, labels: np.ndarray) -> None:
        touched, index = np.unique(users, return_inverse=True)
        mean, precision = update_many(self.mean[touched], self.precision[touched], index, self.vectors[ads], labels,
                                      self.prior, self.update)
        self.mean[touched], self.precision[touched] = mean, precision
        np.add.at(self.count, users, 1)


class RiverThompson:
    """river's non-contextual Thompson-sampling bandit, one Beta arm per ad."""

    name = "river-thompson"

    def __init__(self, n_ads: int, seed: int) -> None:
        from river import bandit, proba

        self.policy = bandit.ThompsonSampling(reward_obj=proba.Beta(), seed=seed)
        self.arms = list(range(n_ads))

    def rank(self, user: int, k: int) -> np.ndarray:
        left, out = list(self.arms), []
        for _ in range(min(k, len(left))):
            arm = self.policy.pull(left)
            out.append(arm)
            left.remove(arm)
        return np.asarray(out, np.int64)

    def learn(self, user: int, ads: np.ndarray, clicked: np.ndarray) -> None:
        for a, y in zip(ads.tolist(), clicked.tolist()):
            self.policy.update(a, bool(y))


class VowpalPolicy:
    """Vowpal Wabbit ``--cb_explore_adf`` over (user id) × (ad id, ad words)."""

    name = "vowpalwabbit"

    def __init__(self, texts: list[str], seed: int, args: str = "--squarecb") -> None:
        import vowpalwabbit

        self.vw = vowpalwabbit.Workspace(f"--cb_explore_adf {args} -q UA --quiet --random_seed {seed}")
        self.actions = [f"|A ad{i} " + " ".join(_token(w) for w in t.split()) for i, t in enumerate(texts)]
        self.rng = np.random.default_rng(seed)
        self._pmf: dict[int, np.ndarray] = {}

    def rank(self, user: int, k: int) -> np.ndarray:
        pmf = np.asarray(self.vw.predict([f"shared |U u{user}", *self.actions]), np.float64)
        pmf = np.maximum(pmf, 1e-12)
        pmf /= pmf.sum()
        self._pmf[user] = pmf
        k = min(k, pmf.shape[0])
        # k draws without replacement from the action distribution (Gumbel top-k = sequential draws)
        return np.argsort(-(np.log(pmf) + self.rng.gumbel(size=pmf.shape[0])))[:k]

    def learn(self, user: int, ads: np.ndarray, clicked: np.ndarray) -> None:
        pmf = self._pmf.pop(user)
        for a, y in zip(ads.tolist(), clicked.tolist()):
            # cost −1 for a click, 0 otherwise, at the probability the action had of being drawn first
            self.vw.learn([f"shared |U u{user}", f"0:{-1.0 if y else 0.0}:{pmf[a]:.6g} {self.actions[a]}"])


def _token(word: str) -> str:
    """A word as a VW feature name (no spaces, colons or pipes)."""
    return "".join(c for c in word.lower() if c not in ":|") or "_"
