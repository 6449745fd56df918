"""Offline evaluation of a policy on logged impressions: the pure part (numpy only, no I/O).

``learner.replay`` reads the logs and builds the slates of the policies that need
served models; this module turns any ``ranker.policy.Policy`` into what the
estimators need (``policy_rows``), holds the reward model the direct method needs,
and runs the estimators of ``learner.estimators`` over them.

Data model: one row per logged impression (an ad shown at a position in a
request), the per-slot model of ``learner.estimators``. A policy is evaluated
through its per-row distribution over the action set at the row's position,
``π_e(· | x_i, pos_i)``, kept sparse (``PolicyRows``): the probability of the
logged action (IPS, SNIPS, DR), one seeded draw from it (replay), and its
expectation under the reward model (DM, DR).

The reward model is the position-based table ``q̂(a, pos)``: each (ad, slot)
cell's click rate, shrunk toward the slot's rate by ``strength`` pseudo
impressions.

Intervals (``ci``):

* ``"normal"`` (the default, analytic): replay, IPS, SNIPS and DR as in
  ``learner.estimators`` (delta method for the ratios). DM's standard error
  adds the reward table's own sampling error through its influence function,
  ``IF_j = (v̂_j − V̂) + n·c(a_j, p_j)·(r_j − q̂(a_j, p_j)) / (N(a_j, p_j) + m)``,
  where ``c(a, p)`` is the policy's mass on cell (a, p) per row and N its
  count: an interval with the table held fixed covers only the sampling of
  rows and is too narrow. DR needs no such term: a small change of q̂ moves its
  direct and its correction part by opposite amounts, in expectation.
* ``"bootstrap"``: percentile bootstrap over rows; DM and DR refit the table
  on every resample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from privads.learner.estimators import CIMethod, OPEResult, dm, dr, ips, replay, snips
from privads.ranker.experiment import wilson
from privads.ranker.policy import Policy, PopularityPolicy, Slate, UniformPolicy

ESTIMATORS = ("replay", "ips", "snips", "dm", "dr")
NEEDS_PSCORE = frozenset({"ips", "snips", "dr"})
REWARD_STRENGTH = 1.0


@dataclass(frozen=True)
class Log:
    """Logged impressions, one row each.

    Attributes
    ----------
    request : ndarray of int, shape (n,)
        Request index (rows of one request share it).
    position : ndarray of int, shape (n,)
        Slot, 0 = top.
    action : ndarray of int, shape (n,)
        Index of the shown ad in ``actions``.
    reward : ndarray, shape (n,)
        Click (0/1) or value.
    pscore : ndarray, shape (n,)
        Logging propensity of the shown ad at its slot; NaN where none was logged.
    actions : list of str
        The action set: every ad id the log shows (``len(actions)`` = A).
    """

    request: np.ndarray
    position: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray
    actions: list[str]

    def __post_init__(self) -> None:
        n = self.reward.shape[0]
        for name in ("request", "position", "action", "pscore"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name}: expected shape ({n},), got {getattr(self, name).shape}")
        if n and (self.action.min() < 0 or self.action.max() >= len(self.actions)):
            raise ValueError("action: indices must be within the action set")
        if n and self.position.min() < 0:
            raise ValueError("position: must be >= 0")

    def __len__(self) -> int:
        return int(self.reward.shape[0])

    @property
    def positions(self) -> int:
        return int(self.position.max()) + 1 if len(self) else 0

    def take(self, idx: np.ndarray) -> Log:
        return Log(self.request[idx], self.position[idx], self.action[idx], self.reward[idx], self.pscore[idx],
                   self.actions)


@dataclass(frozen=True)
class PolicyRows:
    """An evaluation policy's distribution over actions for each logged row, in CSR form.

    Row ``i``'s support is ``support[ptr[i]:ptr[i + 1]]`` (action indices, or -1 for
    an ad outside the log's action set) with probabilities ``prob[...]`` summing
    to at most 1; ``uniform_over`` (when set) replaces the support: every one of
    the A actions with probability 1/A (no per-row storage).

    Attributes
    ----------
    name : str
    logged_prob : ndarray, shape (n,)
        π_e(a_i | x_i, pos_i): the probability of the logged action.
    eval_action : ndarray of int, shape (n,)
        One seeded draw from π_e(· | x_i, pos_i) (for replay); -1 when it is not in the action set.
    ptr, support, prob : ndarray
        The sparse distributions (empty when ``uniform_over`` is set).
    uniform_over : int or None
    notes : list of str
        What the policy assumed (shown in the report).
    """

    name: str
    logged_prob: np.ndarray
    eval_action: np.ndarray
    ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    support: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prob: np.ndarray = field(default_factory=lambda: np.zeros(0))
    uniform_over: int | None = None
    notes: list[str] = field(default_factory=list)

    def expected(self, table: np.ndarray, position: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Σ_a π_e(a | x_i, pos_i) q̂(a, pos_i) per row.

        Parameters
        ----------
        table : ndarray, shape (A, P)
            q̂ of the action set by slot.
        position : ndarray of int, shape (n,)
        fallback : ndarray, shape (P,)
            q̂ of an ad outside the action set (the slot's rate).
        """
        if self.uniform_over is not None:
            return table.mean(axis=0)[position]
        rows = np.repeat(np.arange(len(self.ptr) - 1), np.diff(self.ptr))
        pos = position[rows]
        q = np.where(self.support >= 0, table[np.maximum(self.support, 0), pos], fallback[pos])
        return np.bincount(rows, weights=self.prob * q, minlength=len(self.ptr) - 1)


# --- the reward model ----------------------------------------------------------------------


def fit_reward_table(log: Log, strength: float = REWARD_STRENGTH,
                     weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The position-based reward model: each (action, slot) cell's mean reward shrunk toward the slot's.

    Parameters
    ----------
    log : Log
    strength : float
        Pseudo observations of the slot's mean in every cell.
    weights : ndarray, shape (n,), optional
        Row multiplicities (a bootstrap resample's counts).

    Returns
    -------
    table : ndarray, shape (A, P)
        q̂(a, pos).
    slot : ndarray, shape (P,)
        q̂ of an action never seen at that slot (the slot's mean).
    """
    a, p = len(log.actions), log.positions
    w = np.ones(len(log)) if weights is None else weights
    cell = log.action * p + log.position
    n = np.bincount(cell, weights=w, minlength=a * p).reshape(a, p)
    s = np.bincount(cell, weights=w * log.reward, minlength=a * p).reshape(a, p)
    slot_n = n.sum(axis=0)
    slot = np.divide(s.sum(axis=0), slot_n, out=np.zeros(p), where=slot_n > 0)
    return (s + strength * slot[None, :]) / (n + strength), slot


# --- policies: from any ranker.policy.Policy to the estimators' rows ------------------------

#: a request's slate, and the action index of each of its candidates (-1: outside the log's action set)
SlateOf = Callable[[int], tuple[Slate, np.ndarray]]


def action_set_slate(log: Log) -> Slate:
    """The log's whole action set as one slate (rows = action indices), with its own clicks and impressions.

    The candidates of the policies defined on the log itself (``uniform_policy``,
    ``popularity_policy``); bids are 1 (logs carry none).
    """
    a = len(log.actions)
    return Slate(np.arange(a), clicks=np.bincount(log.action, weights=log.reward, minlength=a),
                 shown=np.bincount(log.action, minlength=a).astype(np.float64), bids=np.ones(a))


def policy_rows(policy: Policy, log: Log, slates: Slate | SlateOf, *, draws: int, rng: np.random.Generator,
                name: str | None = None, notes: list[str] | None = None) -> PolicyRows:
    """``policy``'s distribution over actions at every logged row: what the estimators evaluate.

    Each logged request is ranked with as many slots as the log shows for it.
    π_e(a | slot) is exact for a uniform policy (1/A) and a deterministic one (its
    list), and otherwise the share of ``policy.sample_lists`` draws that put ``a``
    at the slot.

    Parameters
    ----------
    policy : Policy
    log : Log
    slates : Slate or callable
        One slate for every request, whose rows are the log's action indices
        (``action_set_slate``), or ``request → (slate, action index of each
        candidate)`` (``SlateOf``).
    draws : int
        Monte-Carlo lists per request for a stochastic policy.
    rng : numpy Generator
        Replay's draw of a uniform policy's action.
    """
    name, notes, n = name or policy.name, notes or [], len(log)
    if isinstance(slates, Slate):
        a = len(log.actions)
        if policy.uniform and slates.size == a:
            return PolicyRows(name, np.full(n, 1.0 / a), rng.integers(0, a, n), uniform_over=a,
                              notes=notes or [f"uniform over the {a} ads the log shows"])
        if policy.deterministic:  # one list serves every request: slot j shows its j-th ad
            top = slates.rows[policy.rank(slates, max(log.positions, 1)).index]
            served = top[np.minimum(log.position, top.size - 1)]
            return PolicyRows(name, (served == log.action).astype(np.float64), served,
                              ptr=np.arange(n + 1, dtype=np.int64), support=served, prob=np.ones(n), notes=notes)
        constant = slates
        slate_of: SlateOf = lambda _: (constant, constant.rows)  # noqa: E731 - one slate for every request
    else:
        slate_of = slates
    first_row: dict[int, int] = {}
    slots: dict[int, int] = {}
    for i, (req, pos) in enumerate(zip(log.request.tolist(), log.position.tolist(), strict=True)):
        first_row.setdefault(req, i)
        slots[req] = max(slots.get(req, 0), pos + 1)
    requests = np.array(sorted(first_row), dtype=np.int64)
    lists, served = [], []
    for req in requests.tolist():
        slate, actions = slate_of(req)
        k = slots[req]
        drawn = policy.sample_lists(slate, k, draws)
        mc = actions[drawn] if drawn.size else np.zeros((drawn.shape[0], 0), np.int64)
        if mc.shape[1] < k:  # fewer candidates than slots: the missing slots are empty
            mc = np.hstack([mc, np.full((mc.shape[0], k - mc.shape[1]), -1, np.int64)])
        lists.append(mc)
        served.append(mc[0])
    return policy_from_lists(name, log, requests, lists, served, notes)


def uniform_policy(log: Log, rng: np.random.Generator) -> PolicyRows:
    """Every ad of the log's action set equally likely at every slot (``ranker.policy.UniformPolicy``)."""
    return policy_rows(UniformPolicy(rng), log, action_set_slate(log), draws=1, rng=rng)


def logged_policy(log: Log) -> PolicyRows:
    """The logging policy itself (a sanity check: IPS and SNIPS give the on-policy mean reward).

    Not a ``Policy``: it is the log's own choices, π_e = π₀ at every row.
    """
    n = len(log)
    return PolicyRows("logged", log.pscore.copy(), log.action.copy(), ptr=np.arange(n + 1, dtype=np.int64),
                      support=log.action.copy(), prob=np.ones(n),
                      notes=["π_e = π₀: the weights are 1; DM takes q̂ at the logged action (one draw of π₀)"])


def popularity_policy(log: Log, strength: float = REWARD_STRENGTH) -> PolicyRows:
    """Slot j shows the j-th best ad by the log's own click rate (``ranker.policy.PopularityPolicy``).

    All slots pooled, shrunk to the log's mean by ``strength`` impressions.
    Deterministic; the ranking is fitted on the same log it is evaluated on
    (in-sample, so slightly optimistic).
    """
    mean = float(log.reward.mean()) if len(log) else 0.0
    return policy_rows(PopularityPolicy(mean, strength), log, action_set_slate(log), draws=1,
                       rng=np.random.default_rng(0), notes=["ranked by the log's own click rates (in-sample)"])


def policy_from_lists(name: str, log: Log, requests: np.ndarray, lists: list[np.ndarray], served: list[np.ndarray],
                      notes: list[str]) -> PolicyRows:
    """A stochastic ranking policy from Monte-Carlo lists per request.

    Parameters
    ----------
    requests : ndarray of int, shape (R,)
        The request index each entry of ``lists`` is for.
    lists : list of ndarray of int, shape (S, k) each
        S draws of the policy's ranked list (action indices, -1 outside the action set).
    served : list of ndarray of int, shape (k,) each
        One list per request used as replay's deterministic choice (the first draw).

    Returns
    -------
    PolicyRows
        π_e(a | pos) is the share of draws that put a at pos.
    """
    by_request = {int(r): i for i, r in enumerate(requests)}
    n = len(log)
    ptr = np.zeros(n + 1, np.int64)
    supports, probs = [], []
    logged_prob = np.zeros(n)
    eval_action = np.full(n, -1, np.int64)
    for i in range(n):
        j = by_request.get(int(log.request[i]))
        pos = int(log.position[i])
        if j is None or pos >= lists[j].shape[1]:
            supports.append(np.zeros(0, np.int64))
            probs.append(np.zeros(0))
        else:
            acts, counts = np.unique(lists[j][:, pos], return_counts=True)
            p = counts / lists[j].shape[0]
            supports.append(acts)
            probs.append(p)
            hit = acts == log.action[i]
            logged_prob[i] = float(p[hit].sum())
            eval_action[i] = served[j][pos]
        ptr[i + 1] = ptr[i] + supports[-1].size
    return PolicyRows(name, logged_prob, eval_action, ptr=ptr,
                      support=np.concatenate(supports) if supports else np.zeros(0, np.int64),
                      prob=np.concatenate(probs) if probs else np.zeros(0), notes=notes)


# --- evaluation ------------------------------------------------------------------------------


def _seen_table(log: Log) -> np.ndarray:
    seen = np.zeros((len(log.actions), max(log.positions, 1)), dtype=bool)
    seen[log.action, log.position] = True
    return seen


def unsupported(policy: PolicyRows, log: Log) -> float:
    """Share of π_e's mass on (ad, slot) pairs the log never shows: estimates there rely on extrapolation."""
    seen = _seen_table(log)
    n = len(log)
    if n == 0:
        return 0.0
    if policy.uniform_over is not None:
        return float(1.0 - seen[:, log.position].mean(axis=0).mean())
    rows = np.repeat(np.arange(n), np.diff(policy.ptr))
    pos = log.position[rows]
    inside = policy.support >= 0
    hit = np.zeros(policy.support.shape, dtype=bool)
    hit[inside] = seen[policy.support[inside], pos[inside]]
    # mass outside the action set (-1) or on a pair never logged; rows whose slot the policy never fills count
    # as fully unsupported
    covered = np.bincount(rows, weights=policy.prob, minlength=n)
    return float((policy.prob[~hit].sum() + np.maximum(0.0, 1.0 - covered).sum()) / n)


def _dm_terms(policy: PolicyRows, log: Log, table: np.ndarray, slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(v̂_i, q̂(a_i, pos_i)) per row."""
    return policy.expected(table, log.position, slot), table[log.action, log.position]


def _cross_fitted_terms(policy: PolicyRows, log: Log, strength: float, seed: int,
                        folds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(v̂_i, q̂(a_i, pos_i)) with each row's table fitted on the other folds (rows split by request)."""
    n = len(log)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    fold_of_request = np.random.default_rng(seed).integers(0, folds, int(log.request.max()) + 1)
    fold = fold_of_request[log.request]
    v, q = np.empty(n), np.empty(n)
    for f in range(folds):
        mine = fold == f
        table, slot = fit_reward_table(log, strength, (~mine).astype(np.float64))
        vf, qf = _dm_terms(policy, log, table, slot)
        v[mine], q[mine] = vf[mine], qf[mine]
    return v, q


def _refit_interval(policy: PolicyRows, log: Log, kind: str, *, alpha: float, n_bootstrap: int, seed: int,
                    strength: float) -> tuple[float, float]:
    """Percentile bootstrap of DM or DR with the reward table refitted on every resample."""
    rng = np.random.default_rng(seed)
    n = len(log)
    w = policy.logged_prob / log.pscore if kind == "dr" else None
    values = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        table, slot = fit_reward_table(log, strength, counts)
        v, q = _dm_terms(policy, log, table, slot)
        terms = v if w is None else v + w * (log.reward - q)
        values[b] = float(counts @ terms) / n
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def _dm_normal_interval(policy: PolicyRows, log: Log, v: np.ndarray, estimate: float, *, alpha: float,
                        strength: float) -> tuple[float, float]:
    """DM ± z·SE with the reward table's influence included (see the module docstring)."""
    n = len(log)
    a, p = len(log.actions), log.positions
    cell = log.action * p + log.position
    counts = np.bincount(cell, minlength=a * p)
    table, _ = fit_reward_table(log, strength)
    # the policy's mass on each (action, slot) cell, summed over rows
    mass: np.ndarray
    if policy.uniform_over is not None:
        mass = np.repeat(np.bincount(log.position, minlength=p)[None, :] / a, a, axis=0).ravel()
    else:
        rows = np.repeat(np.arange(n), np.diff(policy.ptr))
        inside = policy.support >= 0
        mass = np.bincount(policy.support[inside] * p + log.position[rows][inside], weights=policy.prob[inside],
                           minlength=a * p)
    influence = (v - estimate) + mass[cell] * (log.reward - table[log.action, log.position]) / (counts[cell] + strength)
    se = float(np.sqrt(np.sum((influence - influence.mean()) ** 2)) / n) if n > 1 else float("nan")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return estimate - z * se, estimate + z * se


def evaluate(policy: PolicyRows, log: Log, estimators: tuple[str, ...] = ESTIMATORS, *, ci: CIMethod = "normal",
             alpha: float = 0.05, n_bootstrap: int = 500, seed: int = 0,
             strength: float = REWARD_STRENGTH) -> dict[str, OPEResult]:
    """Run ``estimators`` for ``policy`` on ``log``, each with a ``1 − alpha`` interval (see ``ci`` above).

    Raises
    ------
    ValueError
        Naming the estimator, when an IPS-family estimator is asked for and
        some rows have no logged propensity.
    """
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"estimators: unknown {unknown}; choose from {list(ESTIMATORS)}")
    missing = int(np.isnan(log.pscore).sum())
    if missing and NEEDS_PSCORE & set(estimators):
        raise ValueError(f"{', '.join(sorted(NEEDS_PSCORE & set(estimators)))}: {missing} of {len(log)} rows have no "
                         "logged propensity; use dm or replay, or logs from a policy that logs propensities")
    mass = unsupported(policy, log)
    common: dict[str, Any] = {"alpha": alpha, "n_bootstrap": n_bootstrap, "seed": seed, "ci": ci}
    out: dict[str, OPEResult] = {}
    table, slot = fit_reward_table(log, strength)
    v, q = _dm_terms(policy, log, table, slot)
    v_cf, q_cf = _cross_fitted_terms(policy, log, strength, seed)
    for name in estimators:
        if name == "replay":
            # a choice outside the log's action set (-1) matches no logged action: replay rejects its row. The
            # estimator takes action indices only, so it gets one past the log's last action, which matches none
            outside = np.where(policy.eval_action < 0, int(log.action.max()) + 1, policy.eval_action)
            res = replay(reward=log.reward, action=log.action, eval_action=outside,
                         pscore=log.pscore, position=log.position, **common)
            kept = policy.eval_action == log.action
            if ci == "normal" and kept.any() and np.isin(log.reward, (0.0, 1.0)).all():
                # clicks among the kept rows are binomial: Wilson's interval, not Wald's, at a few hundred rows
                lo, hi = wilson(int(log.reward[kept].sum()), int(kept.sum()), NormalDist().inv_cdf(1 - alpha / 2))
                res = replace(res, ci_lo=min(lo, res.estimate), ci_hi=max(hi, res.estimate))
            out[name] = res
        elif name == "ips":
            out[name] = ips(reward=log.reward, pscore=log.pscore, action_dist=policy.logged_prob,
                            unsupported_mass=mass, **common)
        elif name == "snips":
            out[name] = snips(reward=log.reward, pscore=log.pscore, action_dist=policy.logged_prob,
                              unsupported_mass=mass, **common)
        else:
            # DR's reward model is cross-fitted (each half's rows scored by the table of the other half), so that
            # its residuals are not the in-sample ones, which are too small
            res = dm(estimated_policy_value_per_row=v, unsupported_mass=mass, **common) if name == "dm" else dr(
                reward=log.reward, pscore=log.pscore, action_dist=policy.logged_prob, estimated_rewards=q_cf,
                estimated_policy_value_per_row=v_cf, unsupported_mass=mass, **common)
            if ci == "bootstrap":
                lo, hi = _refit_interval(policy, log, name, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed,
                                         strength=strength)
                res = replace(res, ci_lo=min(lo, res.estimate), ci_hi=max(hi, res.estimate))
            elif name == "dm":
                lo, hi = _dm_normal_interval(policy, log, v, res.estimate, alpha=alpha, strength=strength)
                res = replace(res, ci_lo=lo, ci_hi=hi)
            out[name] = res
    return out
