"""The policies ``privads bench policies`` puts side by side on one simulated audience.

Every one is a ``ranker.policy.Policy``: it ranks a slate of the world's ads
(``rows`` = ad indices, ``user`` = the user's index, ``bids``) into k of them with
``rank``, and learns from ``learn(slate, ranked, clicked)`` after the audience has
reacted. All of them see the same requests (the same users in the same order) and
the same click model (``bench.audience``); each is seeded.

- ``PrivAdsPolicy`` — what the treatment arm serves, in process: the projected
  MiniLM vectors of the ad texts in a ``ranker.index.ServingCatalog``, retrieval
  of ``candidates`` by keys that follow the evidence, the user posteriors of
  ``ranker.updates``, ``ranker.policy.ThompsonPolicy`` with the per-ad
  calibration factors and their categories' pooled priors (refreshed every
  ``evidence_every`` requests, as the API follows the workers' counts about every
  second), the stream's counting (an impression counts as shown, with the pCTR
  it was served at) and its user learning (``ranker.updates.learn_events``: every
  shown ad is a fast negative, every click completes its impression's positive
  step), on the same label schedule as every peer.
- ``RandomPolicy`` — k ads uniformly (``ranker.policy.UniformPolicy``).
- ``PopularityPeer`` — the popularity control of ``/recommend``
  (``ranker.policy.PopularityPolicy``) over its own counts.
- ``RiverThompson`` — river's ``bandit.ThompsonSampling`` with Beta rewards, one
  arm per ad, non-contextual; a list is k pulls without replacement.
- ``VowpalPolicy`` — Vowpal Wabbit's ``--cb_explore_adf`` (SquareCB exploration)
  with the user id as the shared feature, each ad's id, category and text words as its
  action features and their interactions (``-q UA``); a list is k draws without
  replacement from its action distribution; every shown ad is one bandit example,
  whose cost is minus its value (the bid) when clicked: it optimises what is ranked.

River's and VW's propensities beyond the first slot are not computed (NaN): the
bench measures policies online, it does not log them.

The figures compare policies, not systems: no network, no broker.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np

from privads.bench import optional
from privads.infra import keys
from privads.ranker.index import ServingCatalog
from privads.ranker.policy import Policy, PopularityPolicy, Slate, ThompsonParams, ThompsonPolicy, UniformPolicy
from privads.ranker.scoring import Ranked, user_factors
from privads.ranker.service import catalog_evidence, prior_of, retrieve
from privads.ranker.updates import CLICK, IMPRESSION, UpdateParams, learn_events, population_prior


def _unknown(k: int) -> np.ndarray:
    return np.full(k, np.nan)


class RandomPolicy(UniformPolicy):
    """k ads uniformly: the random control."""

    name = "random"


class PopularityPeer(Policy):
    """The control arm's ranking (``PopularityPolicy``) over the clicks and impressions of its own traffic."""

    name = "popularity"
    deterministic = True

    def __init__(self, n_ads: int, prior_ctr: float, strength: float) -> None:
        self.policy = PopularityPolicy(prior_ctr, strength)
        self.clicks = np.zeros(n_ads, np.int64)
        self.shown = np.zeros(n_ads, np.int64)

    def _rank(self, slate: Slate, k: int) -> Ranked:
        return self.policy.rank(replace(slate, clicks=self.clicks[slate.rows], shown=self.shown[slate.rows]), k)

    def learn(self, slate: Slate, ranked: Ranked, clicked: np.ndarray) -> None:
        ads = slate.rows[ranked.index]
        self.shown[ads] += 1
        self.clicks[ads] += clicked.astype(np.int64)


class PrivAdsPolicy(Policy):
    """The treatment arm's policy and online learning, in process (see the module docstring)."""

    name = "privads"

    def __init__(self, vectors: np.ndarray, bids: np.ndarray, categories: list[str | None], users: int,
                 thompson: ThompsonParams, update: UpdateParams, prior_precision: float, seed: int,
                 *, candidates: int = 500, category_strength: float = 5.0,
                 rekey_tolerance: float = 0.1, evidence_every: int = 100, population_strength: float = 10.0,
                 taste_strength: float = 0.0, taste_window: float = 0.0) -> None:
        n, d = vectors.shape
        self.vectors = vectors
        self.catalog = ServingCatalog.build(d, [str(i) for i in range(n)], vectors, bids, np.ones(n, bool), categories)
        self.candidates, self.category_strength = candidates, category_strength
        self.rekey_tolerance, self.evidence_every = rekey_tolerance, evidence_every
        self.factors = np.ones(len(self.catalog.groups))
        self.mean = np.zeros((users, d), np.float32)
        self.precision = np.full((users, d), prior_precision, np.float32)
        self.count = np.zeros(users, np.int64)
        self.prior = np.zeros(d, np.float32)
        # the population prior, as the workers keep it: the learned users' means summed, and how many
        self.known = np.zeros(users, bool)
        self.total = np.zeros(d, np.float64)
        self.population_strength = population_strength
        self.clicks = np.zeros(n, np.int64)
        self.shown = np.zeros(n, np.int64)
        self.expected = np.zeros(n, np.float64)
        self.thompson = ThompsonPolicy(thompson, None, np.random.default_rng(seed))
        self.update = update
        self.requests = 0
        # each user's tastes (the workers keep them per category hash in the user state; here per exact category,
        # the same counts): clicks and the clicks the population-level factor expected, per (user, category)
        self.taste_strength, self.taste_window = taste_strength, taste_window
        self.taste_clicks = np.zeros((users, len(self.catalog.groups)))
        self.taste_expected = np.zeros((users, len(self.catalog.groups)))
        self.taste_shown = np.zeros((users, len(self.catalog.groups)))

    def _rank(self, slate: Slate, k: int) -> Ranked:
        """Retrieve from the catalog (the slate's rows are its rows), then the Thompson policy over them."""
        u, cat = int(slate.user), self.catalog
        mean = self.mean[u] if self.known[u] else self.prior
        rows = retrieve(cat, mean, self.candidates)
        groups = cat.group_ids[rows]
        user = None
        if self.taste_strength > 0:
            user = user_factors(self.taste_clicks[u, groups], self.taste_expected[u, groups], self.taste_strength)
        inner = Slate(rows, u, mean, self.precision[u], int(self.count[u]), cat.vectors[rows],
                      cat.bids[rows], cat.category_ids[rows], clicks=self.clicks[rows], shown=self.shown[rows],
                      expected=self.expected[rows], prior_factor=prior_of(self.factors, groups), user_factor=user)
        ranked = self.thompson.rank(inner, k)
        # positions in the slate's rows (every ad, in row order) of what the inner slate ranked
        position = np.searchsorted(slate.rows, rows[ranked.index])
        return Ranked(position, ranked.score, ranked.propensity, None, ranked.pctr, ranked.factor,
                      user_factor=ranked.user_factor)

    def _follow_evidence(self) -> None:
        """The categories' factors and the retrieval keys, from the counts so far (the API's ``follow_counts``)."""
        cat = self.catalog
        self.factors, means = catalog_evidence(cat, self.clicks, self.expected, self.category_strength,
                                               self.thompson.params.calibration_strength)
        rows = cat.drifted(means, self.rekey_tolerance)
        cat.rekey(rows, means[rows])
        # the population prior, published with each model version (here: as often as the evidence is followed)
        self.prior = population_prior(self.total, int(self.known.sum()), self.population_strength)

    def learn(self, slate: Slate, ranked: Ranked, clicked: np.ndarray) -> None:
        self.requests += 1
        if self.requests % self.evidence_every == 0:
            self._follow_evidence()
        user, ads = int(slate.user), slate.rows[ranked.index]
        assert ranked.pctr is not None  # the Thompson policy logs its pCTR
        # each ad's calibration factor as the policy held it (logged with the impression): the users' logit offset
        assert ranked.factor is not None
        offset = np.log(ranked.factor)
        self.expected[ads] += ranked.pctr
        self.shown[ads] += 1
        self.clicks[ads] += clicked.astype(np.int64)
        # the user's tastes, as the workers count them: expected clicks without the user's own factor
        groups = self.catalog.group_ids[ads]
        own = np.ones(ads.size) if ranked.user_factor is None else ranked.user_factor
        np.add.at(self.taste_expected[user], groups, ranked.pctr * ranked.factor / own)
        np.add.at(self.taste_clicks[user], groups, clicked.astype(np.float64))
        np.add.at(self.taste_shown[user], groups, 1.0)
        # and past the window, scaled back as they are (``keys.window_tastes``; once per request here)
        scale = keys.window_scale(self.taste_shown[user], self.taste_window)
        for counts in (self.taste_clicks, self.taste_expected, self.taste_shown):
            counts[user] *= scale
        # the stream's fast negatives: every shown ad's label-free half, then each click's half
        kinds = np.r_[np.full(ads.size, IMPRESSION), np.full(int(clicked.sum()), CLICK)]
        events = np.r_[ads, ads[clicked]]
        index = np.zeros(events.size, np.int64)
        if not self.known[user]:
            self.mean[user] = self.prior
        before = self.mean[user].astype(np.float64) if self.known[user] else 0.0
        mean, precision = learn_events(self.mean[user:user + 1], self.precision[user:user + 1], index,
                                       self.vectors[events], kinds, self.prior, self.update,
                                       offset=np.r_[offset, np.zeros(int(clicked.sum()))])
        self.mean[user], self.precision[user] = mean[0], precision[0]
        self.count[user] += ads.size
        self.total += mean[0].astype(np.float64) - before
        self.known[user] = True


class RiverThompson(Policy):
    """river's non-contextual Thompson-sampling bandit, one Beta arm per ad."""

    name = "river-thompson"

    def __init__(self, seed: int) -> None:
        from river import bandit, proba

        self.policy = bandit.ThompsonSampling(reward_obj=proba.Beta(), seed=seed)

    def _rank(self, slate: Slate, k: int) -> Ranked:
        position = {int(a): i for i, a in enumerate(slate.rows.tolist())}
        left: list[int | str] = list(position)  # river's arm ids
        out = []
        for _ in range(k):
            arm = self.policy.pull(left)
            out.append(position[int(arm)])
            left.remove(arm)
        return Ranked(np.asarray(out, np.int64), np.zeros(k), _unknown(k))

    def learn(self, slate: Slate, ranked: Ranked, clicked: np.ndarray) -> None:
        for a, y in zip(slate.rows[ranked.index].tolist(), clicked.tolist(), strict=True):
            self.policy.update(a, bool(y))


class VowpalPolicy(Policy):
    """Vowpal Wabbit ``--cb_explore_adf`` over (user id) × (ad id, ad words)."""

    name = "vowpalwabbit"

    def __init__(self, texts: list[str], seed: int, args: str = "--squarecb",
                 categories: list[str | None] | None = None) -> None:
        vowpalwabbit = optional("vowpalwabbit")
        self.vw = vowpalwabbit.Workspace(f"--cb_explore_adf {args} -q UA --quiet --random_seed {seed}")
        cats = categories if categories is not None else [None] * len(texts)
        # the ad's category too, as PrivAds' encoder reads it (ranker.encoder.encoder_input)
        self.actions = [f"|A ad{i} " + (f"category_{_token(c.replace(' ', '_'))} " if c else "")
                        + " ".join(_token(w) for w in t.split())
                        for i, (t, c) in enumerate(zip(texts, cats, strict=True))]
        self.rng = np.random.default_rng(seed)
        # the action distributions of the lists served and not yet learned from, in serving order (labels come
        # back in that order, possibly after the same user was served again)
        self._pmf: deque[tuple[int, np.ndarray]] = deque()

    def _rank(self, slate: Slate, k: int) -> Ranked:
        actions = [self.actions[a] for a in slate.rows.tolist()]
        pmf = np.asarray(self.vw.predict([f"shared |U u{slate.user}", *actions]), np.float64)
        pmf = np.maximum(pmf, 1e-12)
        pmf /= pmf.sum()
        self._pmf.append((int(slate.user), pmf))
        # k draws without replacement from the action distribution (Gumbel top-k = sequential draws)
        index = np.argsort(-(np.log(pmf) + self.rng.gumbel(size=pmf.shape[0])))[:k]
        propensity = _unknown(k)
        propensity[0] = pmf[index[0]]  # the first draw's; later slots' are not computed
        return Ranked(index, np.zeros(k), propensity)

    def learn(self, slate: Slate, ranked: Ranked, clicked: np.ndarray) -> None:
        user, pmf = self._pmf.popleft()
        assert user == int(slate.user), "labels came back out of serving order"
        bids = slate.bids if slate.bids is not None else np.ones(slate.size)
        for i, y in zip(ranked.index.tolist(), clicked.tolist(), strict=True):
            # cost −value (the bid) for a click, 0 otherwise, at the probability the action had of being drawn first
            a = int(slate.rows[i])
            cost = -float(bids[i]) if y else 0.0
            self.vw.learn([f"shared |U u{slate.user}", f"0:{cost:.6g}:{pmf[i]:.6g} {self.actions[a]}"])


def _token(word: str) -> str:
    """A word as a VW feature name (no spaces, colons or pipes)."""
    return "".join(c for c in word.lower() if c not in ":|") or "_"
