"""Off-policy estimators for position-based logged impressions: the pure maths (numpy only, no I/O).

Shaped on Open Bandit Pipeline's estimators (``obp.ope.estimators``, Saito et al., Apache-2.0): each
estimator is written as per-row terms whose aggregate is the estimate, and its confidence
interval comes from resampling those rows. Unlike obp, every estimator here is a *ratio of row
sums* ``Σ a_i / Σ b_i`` (``b_i = 1`` for the plain means), and the bootstrap recomputes that
ratio on every resample, so the self-normalised estimators (SNIPS, replay) get their
denominator's variability too.

As in obp, each estimator is a class (:class:`Replay`, :class:`IPS`, :class:`SNIPS`, :class:`DM`,
:class:`DR`) over one abstract base, :class:`BaseOffPolicyEstimator`, which holds what they share:
the interval arguments' checks, the unsupported-mass warning, the ratio-of-sums interval and the
:class:`OPEResult`. A subclass only checks its inputs and builds its per-row terms ``a_i``,
``b_i``; SNIPS and DR are IPS with another denominator or numerator. The functions
:func:`replay`, :func:`ips`, :func:`snips`, :func:`dm` and :func:`dr` are thin wrappers.

Data model
----------
One row is one shown (ad, position) of one request. Every array is 1-D with one entry per row:

``reward`` (n,)
    observed reward of the row (click 0/1, or a value).
``action`` (n,) int
    the logged ad (action index).
``position`` (n,) int
    the slot it was shown in (0-based).
``pscore`` (n,)
    logging propensity π₀(a_i | x_i, pos_i) of that action at that position; NaN where it was
    not logged.
``action_dist`` (n,)
    evaluation policy's probability π_e(a_i | x_i, pos_i) of the *logged* action at the logged
    position.
``estimated_rewards`` (n,)
    the caller's reward model q̂(x_i, a_i, pos_i) at the logged action.
``estimated_policy_value_per_row`` (n,)
    Σ_a π_e(a | x_i, pos_i) q̂(x_i, a, pos_i): the reward model's expected reward of the
    evaluation policy in that row's (context, position).

The target is the evaluation policy's mean reward per shown slot, over the (context, position)
distribution of the log. Rows are treated as independent draws (the position-based, per-slot
model obp also uses); intervals resample rows, not requests.

Every public estimator returns an :class:`OPEResult`: the estimate, a two-sided ``1 − alpha``
interval and the method that made it, the effective sample size, ``n`` and a list of warnings.
Arguments are checked at the boundary: a bad argument raises ``ValueError`` naming it.

References
----------
Li, Chu, Langford, Wang. "Unbiased Offline Evaluation of Contextual-bandit-based News Article
Recommendation Algorithms." WSDM 2011 (replay).
Strehl, Langford, Li, Kakade. "Learning from Logged Implicit Exploration Data." NeurIPS 2010 (IPS).
Swaminathan, Joachims. "The Self-Normalized Estimator for Counterfactual Learning." NeurIPS 2015.
Dudík, Erhan, Langford, Li. "Doubly Robust Policy Evaluation and Optimization." Stat. Sci. 2014.
Saito, Aihara, Matsutani, Narita. "Open Bandit Dataset and Pipeline." NeurIPS 2021 D&B.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import ClassVar, Literal

import numpy as np

CIMethod = Literal["bootstrap", "normal"]

#: a logging propensity below this is "tiny": its row's importance weight is at least 1000 × π_e
TINY_PSCORE = 1e-3
#: warn when the effective sample size is below this fraction of n
MIN_ESS_RATIO = 0.1
#: replay: propensities whose spread (max − min) exceeds this fraction of their mean are "not uniform"
UNIFORM_RTOL = 1e-3
#: bootstrap resamples drawn per chunk are capped at about this many row indices (memory bound)
_BOOTSTRAP_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class OPEResult:
    """One estimator's answer.

    Attributes
    ----------
    estimator : str
        ``"replay"``, ``"ips"``, ``"snips"``, ``"dm"`` or ``"dr"``.
    estimate : float
        Estimated policy value (NaN when undefined, e.g. replay with no matching row).
    ci_lo, ci_hi : float
        Two-sided ``1 − alpha`` confidence interval.
    ci_method : {"bootstrap", "normal"}
        ``"bootstrap"``: percentile bootstrap over rows (``n_bootstrap`` resamples drawn with
        ``numpy.random.default_rng(seed)``); ``"normal"``: estimate ± z·SE with the analytic
        (delta-method for ratios) standard error.
    alpha : float
        ``1 − alpha`` is the nominal coverage of the interval.
    n_bootstrap : int or None
        Resamples drawn (None for ``"normal"``).
    seed : int or None
        Seed of the bootstrap (None for ``"normal"`` or an unseeded bootstrap).
    ess : float
        Effective sample size (Σw)² / Σw² of the importance weights; the number of matching rows
        for replay; n for DM (no weighting).
    n : int
        Rows given.
    warnings : list of str
        Human-readable diagnostics (tiny propensities, unsupported mass, low ESS, ...).
    """

    estimator: str
    estimate: float
    ci_lo: float
    ci_hi: float
    ci_method: CIMethod
    alpha: float
    n_bootstrap: int | None
    seed: int | None
    ess: float
    n: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-ready dict (NaN floats become None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


# --------------------------------------------------------------------------------------------
# argument checks (obp's check_* style: raise ValueError naming the argument)
# --------------------------------------------------------------------------------------------


def _check_1d(x: object, name: str, *, integer: bool = False) -> np.ndarray:
    """Return ``x`` as a 1-D float (or non-negative int) ndarray, or raise naming ``name``."""
    if x is None:
        raise ValueError(f"{name} is required")
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, but has shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    if integer:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, but has dtype {arr.dtype}")
        if arr.min() < 0:
            raise ValueError(f"{name} must be non-negative, but its minimum is {arr.min()}")
        return arr.astype(np.int64, copy=False)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, but has dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite, but has {int(bad.sum())} NaN/inf entries (first at row "
                         f"{int(np.flatnonzero(bad)[0])})")


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{name} ({length})" for name, length in lengths.items())
        raise ValueError(f"{', '.join(lengths)} must have the same length, but have {listed}")
    return next(iter(lengths.values()))


def _check_probability(arr: np.ndarray, name: str) -> None:
    _check_finite(arr, name)
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"{name} must be probabilities in [0, 1], but ranges over [{arr.min()}, {arr.max()}]")


def _check_pscore(pscore: np.ndarray) -> None:
    """IPS family: every row needs a logged propensity in (0, 1]."""
    nan = np.isnan(pscore)
    if nan.any():
        raise ValueError(
            f"pscore has {int(nan.sum())} of {pscore.shape[0]} rows without a logged propensity (NaN, first at "
            f"row {int(np.flatnonzero(nan)[0])}); the IPS family (ips, snips, dr) needs π₀ for every row: drop "
            "those rows or use dm"
        )
    _check_finite(pscore, "pscore")
    if pscore.min() <= 0.0 or pscore.max() > 1.0:
        raise ValueError(
            f"pscore must be in (0, 1] (a logged row had a positive chance of being shown), but ranges over "
            f"[{pscore.min()}, {pscore.max()}]"
        )


def _check_ci_arguments(alpha: float, ci: str, n_bootstrap: int, seed: int | None) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), but {alpha!r} is given")
    if ci not in ("bootstrap", "normal"):
        raise ValueError(f"ci must be 'bootstrap' or 'normal', but {ci!r} is given")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer, but {n_bootstrap!r} is given")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer or None, but {seed!r} is given")


def _check_fraction(value: float, name: str, *, upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, but {value!r} is given")
    if value < 0.0 or value > 1.0:
        raise ValueError(f"{name} must be in [0, 1], but {value!r} is given")
    return float(value)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size of importance weights.

    Parameters
    ----------
    weights : ndarray, shape (n,)
        Non-negative importance weights w_i = π_e / π₀.

    Returns
    -------
    float
        (Σw)² / Σw², in [0, n]; n when all weights are equal, 0 when all are zero.
    """
    w = _check_1d(weights, "weights")
    _check_finite(w, "weights")
    if w.min() < 0.0:
        raise ValueError(f"weights must be non-negative, but its minimum is {w.min()}")
    sq = float(np.sum(w * w))
    return 0.0 if sq == 0.0 else float(np.sum(w)) ** 2 / sq


def compute_unsupported_mass(
    eval_dist: np.ndarray,
    *,
    logging_dist: np.ndarray | None = None,
    action: np.ndarray | None = None,
    position: np.ndarray | None = None,
) -> float:
    """Share of the evaluation policy's probability mass on actions the logging policy never shows.

    Importance weighting cannot see those actions, so IPS/SNIPS/DR's correction silently drops
    them (biased toward 0 by about this share × their reward) and DM extrapolates its reward
    model there. Pass the result to the estimators as ``unsupported_mass`` to get a warning.

    Two ways to define "never shown", pick one:

    * ``logging_dist`` given (exact): action a is unsupported in row i when π₀(a | row i) = 0.
    * ``action`` and ``position`` given (empirical, context-free): action a is unsupported at
      position p when no logged row shows a at p. This only catches gross extrapolation (an ad
      or slot the log never has); it cannot see context-level gaps.

    Parameters
    ----------
    eval_dist : ndarray, shape (n, n_actions)
        π_e(a | x_i, pos_i) for every action, one row per logged row; rows sum to 1.
    logging_dist : ndarray, shape (n, n_actions), optional
        π₀(a | x_i, pos_i) for every action.
    action : ndarray of int, shape (n,), optional
        Logged actions (with ``position``), all < n_actions.
    position : ndarray of int, shape (n,), optional
        Logged positions (with ``action``).

    Returns
    -------
    float
        mean_i Σ_a π_e(a | row i) · 1[a unsupported in row i], in [0, 1].
    """
    eval_dist = np.asarray(eval_dist, dtype=np.float64)
    if eval_dist.ndim != 2 or eval_dist.shape[0] == 0:
        raise ValueError(f"eval_dist must be 2-dimensional (n, n_actions) and non-empty, but has shape "
                         f"{eval_dist.shape}")
    _check_probability(eval_dist.ravel(), "eval_dist")
    if not np.allclose(eval_dist.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("eval_dist rows must sum to 1 (a distribution over actions per row)")
    n, n_actions = eval_dist.shape
    if logging_dist is not None:
        if action is not None or position is not None:
            raise ValueError("give either logging_dist or (action, position), not both")
        logging_dist = np.asarray(logging_dist, dtype=np.float64)
        if logging_dist.shape != eval_dist.shape:
            raise ValueError(f"logging_dist must have eval_dist's shape {eval_dist.shape}, but has "
                             f"{logging_dist.shape}")
        _check_probability(logging_dist.ravel(), "logging_dist")
        unsupported = logging_dist <= 0.0
    else:
        if action is None or position is None:
            raise ValueError("give logging_dist, or both action and position")
        action = _check_1d(action, "action", integer=True)
        position = _check_1d(position, "position", integer=True)
        _check_same_length(eval_dist=eval_dist, action=action, position=position)
        if action.max() >= n_actions:
            raise ValueError(f"action must be < n_actions = eval_dist.shape[1] = {n_actions}, but its maximum is "
                             f"{action.max()}")
        seen = np.zeros((int(position.max()) + 1, n_actions), dtype=bool)
        seen[position, action] = True
        unsupported = ~seen[position]
    return float(np.sum(eval_dist * unsupported) / n)


# --------------------------------------------------------------------------------------------
# the estimators: one base class with the shared machinery, one subclass per estimator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is elementwise, not a bool
class RatioTerms:
    """An estimator's per-row terms: the estimate is ``Σ a_i / Σ b_i``.

    Attributes
    ----------
    numerator : ndarray, shape (n,)
        a_i.
    denominator : ndarray, shape (n,) or None
        b_i; None for b_i = 1 (a plain mean of the a_i). Kept apart from an array of ones because
        the plain mean's normal interval uses sd(a)/√n, not the delta method.
    ess : float
        Effective sample size reported with the estimate.
    """

    numerator: np.ndarray
    denominator: np.ndarray | None
    ess: float


@dataclass(kw_only=True, eq=False)
class BaseOffPolicyEstimator(ABC):
    """One off-policy estimate: the inputs are the fields, :meth:`estimate` the procedure.

    A subclass declares its inputs as keyword-only fields, checks them in ``__post_init__`` (so a
    bad argument raises ``ValueError`` naming it on construction) and overrides
    :meth:`_ratio_terms`, which turns them into the per-row terms of ``Σ a_i / Σ b_i`` and the
    ESS. The rest is shared here: the interval arguments' checks, the unsupported-mass warning,
    the ratio-of-sums interval and the :class:`OPEResult`. The module functions (:func:`ips`, ...)
    are ``Class(**kwargs).estimate()``. (obp passes the data to ``estimate_policy_value`` instead,
    which would give every subclass its own public signature; fields keep ``estimate`` shared.)

    Parameters
    ----------
    alpha : float, default 0.05
        The interval has nominal coverage 1 − alpha.
    ci : {"bootstrap", "normal"}, default "bootstrap"
        Percentile bootstrap over rows, or the normal interval (delta method for a ratio).
    n_bootstrap : int, default 1000
        Bootstrap resamples.
    seed : int or None, default 0
        Bootstrap seed: equal seeds give equal intervals.
    """

    alpha: float = 0.05
    ci: CIMethod = "bootstrap"
    n_bootstrap: int = 1000
    seed: int | None = 0

    #: ``OPEResult.estimator``
    name: ClassVar[str]
    #: the unsupported-mass warning's second half: what this estimator does with that mass (``{name}`` is filled in)
    unsupported_effect: ClassVar[str]

    def estimate(self) -> OPEResult:
        """Estimate the policy value with a two-sided ``1 − alpha`` interval.

        Returns
        -------
        OPEResult
            Warnings in the order they arise: the estimator's own, then the interval's, then
            :meth:`_after_interval`'s.
        """
        # after the inputs (checked on construction) and before any term: a bad alpha is reported ahead of, say,
        # a bad unsupported_mass, which is only looked at when its warning is built
        _check_ci_arguments(self.alpha, self.ci, self.n_bootstrap, self.seed)
        warnings: list[str] = []
        terms = self._ratio_terms(warnings)
        estimate, lo, hi = self._ratio_terms_interval(terms.numerator, terms.denominator, warnings)
        self._after_interval(terms, warnings)
        boot = self.ci == "bootstrap"
        return OPEResult(estimator=self.name, estimate=estimate, ci_lo=lo, ci_hi=hi, ci_method=self.ci,
                         alpha=float(self.alpha), n_bootstrap=int(self.n_bootstrap) if boot else None,
                         seed=int(self.seed) if boot and self.seed is not None else None, ess=float(terms.ess),
                         n=int(terms.numerator.shape[0]), warnings=warnings)

    @abstractmethod
    def _ratio_terms(self, warnings: list[str]) -> RatioTerms:
        """The per-row terms a_i, b_i (shape (n,)) and the ESS; appends the estimator's diagnostics to ``warnings``."""

    def _after_interval(self, terms: RatioTerms, warnings: list[str]) -> None:  # noqa: B027 (an optional hook)
        """Diagnostics that come after the interval's own in ``warnings`` (replay's match count); none here."""

    def _unsupported_warning(self, unsupported_mass: float | None, warnings: list[str]) -> None:
        """Warn when π_e puts mass on actions the log never shows (checked here, as it is only used here)."""
        if unsupported_mass is None:
            return
        mass = _check_fraction(unsupported_mass, "unsupported_mass")
        if mass > 0.0:
            warnings.append(f"{mass:.1%} of the evaluation policy's mass is on actions the log never shows: "
                            + self.unsupported_effect.format(name=self.name))

    def _ratio_terms_interval(
        self, a: np.ndarray, b: np.ndarray | None, warnings: list[str]
    ) -> tuple[float, float, float]:
        """Estimate Σa / Σb (mean of ``a`` when ``b`` is None) and its ``1 − alpha`` interval.

        Parameters
        ----------
        a : ndarray, shape (n,)
            Per-row numerator terms.
        b : ndarray, shape (n,) or None
            Per-row denominator terms (None: all ones, i.e. a plain mean).
        warnings : list of str
            Appended to when the interval is undefined or drops resamples.

        Returns
        -------
        (estimate, lo, hi) : tuple of float
        """
        alpha, n_bootstrap = self.alpha, self.n_bootstrap
        n = a.shape[0]
        denom = float(n) if b is None else float(np.sum(b))
        if denom == 0.0:
            return float("nan"), float("nan"), float("nan")
        estimate = float(np.sum(a)) / denom

        if self.ci == "normal":
            if n < 2:
                warnings.append("normal interval undefined with fewer than 2 rows")
                return estimate, float("nan"), float("nan")
            if b is None:
                se = float(np.std(a, ddof=1)) / math.sqrt(n)
            else:
                # delta method for a ratio of means: residuals e_i = a_i − θ b_i (mean 0)
                resid = a - estimate * b
                se = math.sqrt(float(np.sum(resid * resid)) / (n * (n - 1))) / (denom / n)
            z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
            return estimate, estimate - z * se, estimate + z * se

        rng = np.random.default_rng(self.seed)
        stats = np.empty(n_bootstrap, dtype=np.float64)
        chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
        for start in range(0, n_bootstrap, chunk):
            stop = min(n_bootstrap, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            num = a[idx].sum(axis=1)
            if b is None:
                stats[start:stop] = num / n
            else:
                den = b[idx].sum(axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    stats[start:stop] = np.where(den != 0.0, num / np.where(den != 0.0, den, 1.0), np.nan)
        dropped = int(np.isnan(stats).sum())
        if dropped == n_bootstrap:
            warnings.append("every bootstrap resample had a zero denominator: no interval")
            return estimate, float("nan"), float("nan")
        if dropped:
            warnings.append(f"{dropped} of {n_bootstrap} bootstrap resamples had a zero denominator and were dropped")
        lo, hi = np.nanpercentile(stats, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
        return estimate, float(lo), float(hi)


@dataclass(kw_only=True, eq=False)
class Replay(BaseOffPolicyEstimator):
    """Rejection replay, :func:`replay`: a_i = 1[e_i = a_i] r_i, b_i = 1[e_i = a_i]; ESS = matching rows.

    Parameters
    ----------
    reward, pscore : ndarray, shape (n,) (pscore optional)
    action, eval_action, position : ndarray of int, shape (n,) (position optional)
    uniform_rtol : float
        As in :func:`replay`; alpha, ci, n_bootstrap, seed as in :class:`BaseOffPolicyEstimator`.
    """

    reward: np.ndarray
    action: np.ndarray
    eval_action: np.ndarray
    pscore: np.ndarray | None = None
    position: np.ndarray | None = None
    uniform_rtol: float = UNIFORM_RTOL

    name: ClassVar[str] = "replay"

    def __post_init__(self) -> None:
        self.reward = _check_1d(self.reward, "reward")
        self.action = _check_1d(self.action, "action", integer=True)
        self.eval_action = _check_1d(self.eval_action, "eval_action", integer=True)
        arrays = {"reward": self.reward, "action": self.action, "eval_action": self.eval_action}
        # pscore and position are optional: checked (and length-matched) only when given
        if self.pscore is not None:
            self.pscore = arrays["pscore"] = _check_1d(self.pscore, "pscore")
        if self.position is not None:
            self.position = arrays["position"] = _check_1d(self.position, "position", integer=True)
        _check_same_length(**arrays)
        _check_finite(self.reward, "reward")

    def _ratio_terms(self, warnings: list[str]) -> RatioTerms:
        _check_fraction(self.uniform_rtol, "uniform_rtol")
        self._uniformity_warnings(warnings)
        match = (self.action == self.eval_action).astype(np.float64)
        return RatioTerms(numerator=match * self.reward, denominator=match, ess=float(match.sum()))

    def _uniformity_warnings(self, warnings: list[str]) -> None:
        """Replay is unbiased only on a uniform log: warn when the propensities say otherwise (or are missing)."""
        pscore, position, n = self.pscore, self.position, self.reward.shape[0]
        if pscore is None:
            warnings.append("no pscore given: cannot check that the log is uniform, which replay needs to be unbiased")
            return
        logged = ~np.isnan(pscore)
        if not logged.all():
            warnings.append(f"{int((~logged).sum())} of {n} rows have no logged propensity (NaN): uniformity "
                            "checked on the others")
        # the number of candidates may differ between slots, so uniformity is per position when positions are known
        groups = [logged] if position is None else [logged & (position == p) for p in np.unique(position)]
        for g in groups:
            ps = pscore[g]
            if ps.size and (ps.max() - ps.min()) > self.uniform_rtol * abs(ps.mean()):
                where = "" if position is None else f" at position {int(position[g][0])}"
                warnings.append(f"log is not uniform{where}: propensities range over [{ps.min():.3g}, "
                                f"{ps.max():.3g}]; replay is biased toward the logging policy's choices, use ips/snips")
                break

    def _after_interval(self, terms: RatioTerms, warnings: list[str]) -> None:
        """How many rows match: after the interval's warnings, so the list reads as it always has."""
        kept, n = int(terms.ess), terms.numerator.shape[0]
        if kept == 0:
            warnings.append("no logged action matches the evaluation policy's choice: replay is undefined")
        elif kept < MIN_ESS_RATIO * n:
            warnings.append(f"only {kept} of {n} rows ({kept / n:.1%}) match the evaluation policy's choice")


@dataclass(kw_only=True, eq=False)
class IPS(BaseOffPolicyEstimator):
    """Inverse propensity scoring, :func:`ips`: a_i = w_i r_i, b_i = 1 (a plain mean); ESS of the weights.

    Holds the importance-weighting machinery that :class:`SNIPS` and :class:`DR` inherit (the
    checks of reward, pscore and action_dist, w_i = π_e / π₀, the ESS, the tiny-propensity and
    low-ESS warnings); they override only :meth:`_denominator` or :meth:`_numerator`.

    Parameters
    ----------
    reward, pscore, action_dist : ndarray, shape (n,)
    unsupported_mass, tiny_pscore, min_ess_ratio : float
        As in :func:`ips`; alpha, ci, n_bootstrap, seed as in :class:`BaseOffPolicyEstimator`.
    """

    reward: np.ndarray
    pscore: np.ndarray
    action_dist: np.ndarray
    unsupported_mass: float | None = None
    tiny_pscore: float = TINY_PSCORE
    min_ess_ratio: float = MIN_ESS_RATIO

    name: ClassVar[str] = "ips"
    unsupported_effect: ClassVar[str] = ("{name} cannot see their reward and is biased (toward 0 for ips/snips, "
                                         "toward the reward model for dr)")

    def __post_init__(self) -> None:
        self.reward = _check_1d(self.reward, "reward")
        self.pscore = _check_1d(self.pscore, "pscore")
        self.action_dist = _check_1d(self.action_dist, "action_dist")
        _check_same_length(reward=self.reward, pscore=self.pscore, action_dist=self.action_dist)
        _check_finite(self.reward, "reward")
        _check_pscore(self.pscore)
        _check_probability(self.action_dist, "action_dist")
        _check_fraction(self.tiny_pscore, "tiny_pscore")
        _check_fraction(self.min_ess_ratio, "min_ess_ratio")

    def _ratio_terms(self, warnings: list[str]) -> RatioTerms:
        w = self.action_dist / self.pscore
        ess = effective_sample_size(w)
        self._weight_warnings(w, ess, warnings)
        self._unsupported_warning(self.unsupported_mass, warnings)
        return RatioTerms(numerator=self._numerator(w), denominator=self._denominator(w, warnings), ess=ess)

    def _numerator(self, weights: np.ndarray) -> np.ndarray:
        """a_i = w_i r_i, shape (n,), from the weights w_i = π_e / π₀, shape (n,)."""
        return weights * self.reward

    def _denominator(self, weights: np.ndarray, warnings: list[str]) -> np.ndarray | None:
        """b_i, shape (n,), from the weights, shape (n,): None here, i.e. 1 for every row (IPS divides by n).

        ``warnings`` is for a subclass whose denominator can vanish.
        """
        return None

    def _weight_warnings(self, weights: np.ndarray, ess: float, warnings: list[str]) -> None:
        """Tiny propensities (huge weights) and a low ESS: the estimate rests on a few rows."""
        pscore, n = self.pscore, self.pscore.shape[0]
        tiny = pscore < self.tiny_pscore
        if tiny.any():
            warnings.append(
                f"{int(tiny.sum())} of {n} rows have pscore < {self.tiny_pscore:g} (min {pscore.min():.3g}); largest "
                f"importance weight {weights.max():.3g}"
            )
        if ess < self.min_ess_ratio * n:
            warnings.append(f"effective sample size {ess:.1f} is {ess / n:.1%} of n = {n} "
                            f"(< {self.min_ess_ratio:.0%}): the estimate rests on few rows and its interval may "
                            "under-cover")


@dataclass(kw_only=True, eq=False)
class SNIPS(IPS):
    """Self-normalised IPS, :func:`snips`: :class:`IPS` with b_i = w_i instead of 1 (its only override).

    Parameters
    ----------
    As in :class:`IPS`.
    """

    name: ClassVar[str] = "snips"

    def _denominator(self, weights: np.ndarray, warnings: list[str]) -> np.ndarray | None:
        """b_i = w_i; warns when they are all 0 (Σ w = 0: the estimate is undefined)."""
        if not weights.any():
            warnings.append("every importance weight is 0 (π_e never picks a logged action): snips is undefined")
        return weights


@dataclass(kw_only=True, eq=False)
class DM(BaseOffPolicyEstimator):
    """Direct method, :func:`dm`: a_i = v̂_i, b_i = 1 (a plain mean); ESS = n (no weighting).

    Parameters
    ----------
    estimated_policy_value_per_row : ndarray, shape (n,)
    unsupported_mass : float, optional
        As in :func:`dm`; alpha, ci, n_bootstrap, seed as in :class:`BaseOffPolicyEstimator`.
    """

    estimated_policy_value_per_row: np.ndarray
    unsupported_mass: float | None = None

    name: ClassVar[str] = "dm"
    unsupported_effect: ClassVar[str] = "{name} extrapolates the reward model there"

    def __post_init__(self) -> None:
        self.estimated_policy_value_per_row = _check_1d(self.estimated_policy_value_per_row,
                                                        "estimated_policy_value_per_row")
        _check_finite(self.estimated_policy_value_per_row, "estimated_policy_value_per_row")

    def _ratio_terms(self, warnings: list[str]) -> RatioTerms:
        self._unsupported_warning(self.unsupported_mass, warnings)
        v = self.estimated_policy_value_per_row
        return RatioTerms(numerator=v, denominator=None, ess=float(v.shape[0]))


@dataclass(kw_only=True, eq=False)
class DR(IPS):
    """Doubly robust, :func:`dr`: :class:`IPS` with a_i = v̂_i + w_i (r_i − q̂_i) (overrides the numerator).

    Parameters
    ----------
    reward, pscore, action_dist, unsupported_mass, tiny_pscore, min_ess_ratio
        As in :class:`IPS`.
    estimated_rewards, estimated_policy_value_per_row : ndarray, shape (n,)
        As in :func:`dr`.
    """

    estimated_rewards: np.ndarray
    estimated_policy_value_per_row: np.ndarray

    name: ClassVar[str] = "dr"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.estimated_rewards = _check_1d(self.estimated_rewards, "estimated_rewards")
        self.estimated_policy_value_per_row = _check_1d(self.estimated_policy_value_per_row,
                                                        "estimated_policy_value_per_row")
        _check_same_length(reward=self.reward, estimated_rewards=self.estimated_rewards,
                           estimated_policy_value_per_row=self.estimated_policy_value_per_row)
        _check_finite(self.estimated_rewards, "estimated_rewards")
        _check_finite(self.estimated_policy_value_per_row, "estimated_policy_value_per_row")

    def _numerator(self, weights: np.ndarray) -> np.ndarray:
        """a_i = v̂_i + w_i (r_i − q̂_i): the DM term plus the weighted residual of the reward model."""
        return self.estimated_policy_value_per_row + weights * (self.reward - self.estimated_rewards)


# --------------------------------------------------------------------------------------------
# the estimators as functions: the public API, each a thin wrapper over its class
# --------------------------------------------------------------------------------------------


def replay(
    *,
    reward: np.ndarray,
    action: np.ndarray,
    eval_action: np.ndarray,
    pscore: np.ndarray | None = None,
    position: np.ndarray | None = None,
    alpha: float = 0.05,
    ci: CIMethod = "bootstrap",
    n_bootstrap: int = 1000,
    seed: int | None = 0,
    uniform_rtol: float = UNIFORM_RTOL,
) -> OPEResult:
    """Rejection replay (Li et al. 2011) of a deterministic evaluation policy.

    Keeps the rows where the evaluation policy's choice for that (request, position) equals
    the logged action and averages their reward:

        V̂ = Σ_i 1[e_i = a_i] r_i / Σ_i 1[e_i = a_i].

    Unbiased when the log is uniformly random (every action equally likely at each position);
    otherwise it estimates a reweighted value, and the result carries a warning when the given
    propensities vary.

    Parameters
    ----------
    reward : ndarray, shape (n,)
        Observed reward of each row.
    action : ndarray of int, shape (n,)
        Logged action of each row.
    eval_action : ndarray of int, shape (n,)
        The evaluation policy's (deterministic) action for that row's request and position.
    pscore : ndarray, shape (n,), optional
        Logging propensities, used only to check that the log is uniform (NaN entries are
        ignored). Without them uniformity cannot be checked, which is warned.
    position : ndarray of int, shape (n,), optional
        Logged positions; when given, uniformity is checked within each position (the number
        of candidates may differ between slots).
    alpha : float, default 0.05
        The interval has nominal coverage 1 − alpha.
    ci : {"bootstrap", "normal"}, default "bootstrap"
        Percentile bootstrap over rows, or the normal interval (delta method for the ratio).
    n_bootstrap : int, default 1000
        Bootstrap resamples.
    seed : int or None, default 0
        Bootstrap seed: equal seeds give equal intervals.
    uniform_rtol : float, default 1e-3
        Propensities whose spread (max − min) exceeds ``uniform_rtol`` × their mean are
        "not uniform".

    Returns
    -------
    OPEResult
        ``ess`` is the number of matching rows. NaN estimate (with a warning) when no row matches.
    """
    return Replay(reward=reward, action=action, eval_action=eval_action, pscore=pscore, position=position,
                  alpha=alpha, ci=ci, n_bootstrap=n_bootstrap, seed=seed, uniform_rtol=uniform_rtol).estimate()


def ips(
    *,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    unsupported_mass: float | None = None,
    alpha: float = 0.05,
    ci: CIMethod = "bootstrap",
    n_bootstrap: int = 1000,
    seed: int | None = 0,
    tiny_pscore: float = TINY_PSCORE,
    min_ess_ratio: float = MIN_ESS_RATIO,
) -> OPEResult:
    """Inverse propensity scoring: V̂ = (1/n) Σ_i w_i r_i with w_i = π_e(a_i|x_i,pos_i) / π₀(a_i|x_i,pos_i).

    Unbiased when every action π_e can choose has π₀ > 0 and the propensities are right;
    high variance when the weights are large.

    Parameters
    ----------
    reward : ndarray, shape (n,)
        Observed reward of each row.
    pscore : ndarray, shape (n,)
        Logging propensity of the logged action at the logged position, in (0, 1]; a NaN
        (unlogged) entry raises ``ValueError``.
    action_dist : ndarray, shape (n,)
        Evaluation policy's probability of the logged action at the logged position, in [0, 1].
    unsupported_mass : float in [0, 1], optional
        Share of π_e's mass on actions the log never shows (see
        :func:`compute_unsupported_mass`); warned when > 0.
    alpha, ci, n_bootstrap, seed
        As in :func:`replay`; ``"normal"`` uses SE = sd(w r) / √n.
    tiny_pscore : float, default 1e-3
        Rows with pscore below it are counted in a warning.
    min_ess_ratio : float, default 0.1
        Warn when ESS < min_ess_ratio × n.

    Returns
    -------
    OPEResult
    """
    return IPS(reward=reward, pscore=pscore, action_dist=action_dist, unsupported_mass=unsupported_mass, alpha=alpha,
               ci=ci, n_bootstrap=n_bootstrap, seed=seed, tiny_pscore=tiny_pscore,
               min_ess_ratio=min_ess_ratio).estimate()


def snips(
    *,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    unsupported_mass: float | None = None,
    alpha: float = 0.05,
    ci: CIMethod = "bootstrap",
    n_bootstrap: int = 1000,
    seed: int | None = 0,
    tiny_pscore: float = TINY_PSCORE,
    min_ess_ratio: float = MIN_ESS_RATIO,
) -> OPEResult:
    """Self-normalised IPS: V̂ = Σ_i w_i r_i / Σ_i w_i.

    Biased by O(1/n) but with bounded estimates and usually much less variance than IPS. The
    bootstrap recomputes the ratio on every resample; ``"normal"`` uses the delta method,
    SE = √(Σ (w_i r_i − V̂ w_i)² / (n (n−1))) / mean(w).

    Parameters
    ----------
    As in :func:`ips`.

    Returns
    -------
    OPEResult
        NaN estimate (with a warning) when every weight is 0.
    """
    return SNIPS(reward=reward, pscore=pscore, action_dist=action_dist, unsupported_mass=unsupported_mass, alpha=alpha,
                 ci=ci, n_bootstrap=n_bootstrap, seed=seed, tiny_pscore=tiny_pscore,
                 min_ess_ratio=min_ess_ratio).estimate()


def dm(
    *,
    estimated_policy_value_per_row: np.ndarray,
    unsupported_mass: float | None = None,
    alpha: float = 0.05,
    ci: CIMethod = "bootstrap",
    n_bootstrap: int = 1000,
    seed: int | None = 0,
) -> OPEResult:
    """Direct method: V̂ = (1/n) Σ_i Σ_a π_e(a|x_i,pos_i) q̂(x_i,a,pos_i).

    Needs no propensities; unbiased only if the reward model q̂ is. The interval resamples rows
    with q̂ held fixed: it covers the sampling of contexts and positions, *not* the error of the
    fitted model, so with a fitted q̂ it is too narrow (see the tests' simulation).

    Parameters
    ----------
    estimated_policy_value_per_row : ndarray, shape (n,)
        Σ_a π_e(a|x_i,pos_i) q̂(x_i,a,pos_i) for each logged row (the caller fits q̂).
    unsupported_mass : float in [0, 1], optional
        Share of π_e's mass on actions the log never shows; warned when > 0 (DM extrapolates).
    alpha, ci, n_bootstrap, seed
        As in :func:`replay`; ``"normal"`` uses SE = sd / √n.

    Returns
    -------
    OPEResult
        ``ess`` is n (no weighting).
    """
    return DM(estimated_policy_value_per_row=estimated_policy_value_per_row, unsupported_mass=unsupported_mass,
              alpha=alpha, ci=ci, n_bootstrap=n_bootstrap, seed=seed).estimate()


def dr(
    *,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    estimated_rewards: np.ndarray,
    estimated_policy_value_per_row: np.ndarray,
    unsupported_mass: float | None = None,
    alpha: float = 0.05,
    ci: CIMethod = "bootstrap",
    n_bootstrap: int = 1000,
    seed: int | None = 0,
    tiny_pscore: float = TINY_PSCORE,
    min_ess_ratio: float = MIN_ESS_RATIO,
) -> OPEResult:
    """Doubly robust: V̂ = (1/n) Σ_i [ v̂_i + w_i (r_i − q̂(x_i,a_i,pos_i)) ].

    ``v̂_i`` is the DM term of row i and ``w_i = π_e/π₀`` as in :func:`ips`. Unbiased when the
    propensities are right, whatever q̂ (and low-variance when q̂ is good). The interval
    resamples rows with q̂ fixed, like DM, but here the residual term carries q̂'s error.

    Parameters
    ----------
    reward, pscore, action_dist
        As in :func:`ips`.
    estimated_rewards : ndarray, shape (n,)
        q̂(x_i, a_i, pos_i): the reward model at the logged action and position.
    estimated_policy_value_per_row : ndarray, shape (n,)
        Σ_a π_e(a|x_i,pos_i) q̂(x_i,a,pos_i), as in :func:`dm`.
    unsupported_mass, alpha, ci, n_bootstrap, seed, tiny_pscore, min_ess_ratio
        As in :func:`ips`; ``"normal"`` uses SE = sd of the per-row terms / √n.

    Returns
    -------
    OPEResult
        ``ess`` is that of the importance weights.
    """
    return DR(reward=reward, pscore=pscore, action_dist=action_dist, estimated_rewards=estimated_rewards,
              estimated_policy_value_per_row=estimated_policy_value_per_row, unsupported_mass=unsupported_mass,
              alpha=alpha, ci=ci, n_bootstrap=n_bootstrap, seed=seed, tiny_pscore=tiny_pscore,
              min_ess_ratio=min_ess_ratio).estimate()


__all__ = [
    "DM",
    "DR",
    "IPS",
    "MIN_ESS_RATIO",
    "SNIPS",
    "TINY_PSCORE",
    "UNIFORM_RTOL",
    "BaseOffPolicyEstimator",
    "CIMethod",
    "OPEResult",
    "RatioTerms",
    "Replay",
    "compute_unsupported_mass",
    "dm",
    "dr",
    "effective_sample_size",
    "ips",
    "replay",
    "snips",
]
