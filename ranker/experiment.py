"""A/B arms and online lift: the pure maths (no I/O).

Users are split by a salted hash of ``user_id`` so that a user stays in one arm.
Lift is ``CTR_treatment / CTR_control − 1`` with a delta-method interval on the
log of the CTR ratio and a two-sided z-test of equal CTRs (two independent
binomial samples; impressions treated as independent trials, which ignores
within-user correlation and so understates the variance when users see many ads).

Those two are valid for one look at a fixed sample. A dashboard that is
watched until the interval excludes 0 looks many times, and the chance that a
fixed-sample p-value *ever* drops below 0.05 under no effect grows with every
look. ``sequential_lift`` gives the always-valid alternative: the mixture
sequential probability ratio test (Johari, Pekelis, Walsh, "Always Valid
Inference", 2017) on the log CTR ratio θ̂ with its delta-method variance v and a
normal mixing distribution N(0, τ²):

    Λ = sqrt(v / (v + τ²)) · exp(τ² θ̂² / (2 v (v + τ²))),   p = min(1, 1/Λ),

and the confidence sequence {θ : Λ(θ) < 1/α}, of half-width
sqrt(v (v + τ²) / τ² · (2 log(1/α) + log((v + τ²) / v))). By Ville's
inequality the chance that p is ever ≤ α, over all looks, is at most α. This
assumes the normal approximation of θ̂ and a sample that only grows: a window
that starts at the experiment's start, not a sliding one.

Value (a click's optional ``value``: revenue, a conversion's worth) is judged the
same way: each arm's value per impression ``V = Σ value / n`` (an impression
without a click is worth 0), its variance from the arm's sum of squared values,
``s² = Σ value² / n − V²``, and the lift ``V_t / V_c − 1`` with the delta-method
variance of its log, ``s_t² / (n_t V_t²) + s_c² / (n_c V_c²)``, in both the one-look
and the always-valid forms. With every value 1 these are the CTR formulas above.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

TREATMENT = "treatment"
CONTROL = "control"
ARMS = (TREATMENT, CONTROL)
Z95 = 1.959963984540054


def learned_arm(arm: str, control_policy: str) -> bool:
    """Whether ``arm`` is served by a learned (Thompson) policy: the treatment always, the control when pinned.

    The learned arms log what ranking used (``pctr``, ``factor``, ``user_factor``);
    the popularity and random controls do not.
    """
    return arm == TREATMENT or control_policy == "pinned"


def assign_arm(user_id: str, salt: str, control_share: float) -> str:
    """Sticky arm of a user: ``control`` for a ``control_share`` fraction of ids."""
    h = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    return CONTROL if u < control_share else TREATMENT


def wilson(clicks: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = clicks / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Lift:
    lift: float | None
    ci95: tuple[float, float] | None
    p_value: float | None


@dataclass(frozen=True, slots=True)
class SequentialLift:
    ci95: tuple[float, float] | None
    p_value: float | None


#: the mixing distribution's scale on the log CTR ratio: tuned to lifts of about ±20%
MIXING_SD = 0.2


def sequential_lift(clicks_t: int, n_t: int, clicks_c: int, n_c: int, alpha: float = 0.05,
                    tau: float = MIXING_SD) -> SequentialLift:
    """Always-valid interval of the lift and p-value of no lift (mSPRT, see the module docstring)."""
    if n_t == 0 or n_c == 0 or clicks_t == 0 or clicks_c == 0:
        return SequentialLift(None, None)
    p_t, p_c = clicks_t / n_t, clicks_c / n_c
    return _msprt(math.log(p_t / p_c), (1 - p_t) / (n_t * p_t) + (1 - p_c) / (n_c * p_c), alpha, tau)


def _msprt(theta: float, v: float, alpha: float, tau: float) -> SequentialLift:
    """The mSPRT's confidence sequence and p-value for a log ratio ``theta`` of delta-method variance ``v``."""
    if v <= 0:  # every impression clicked in both arms: no uncertainty left to test against
        return SequentialLift((math.exp(theta) - 1.0, math.exp(theta) - 1.0), 1.0 if theta == 0 else 0.0)
    t2 = tau * tau
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
    log_lambda = 0.5 * math.log(v / (v + t2)) + t2 * theta * theta / (2 * v * (v + t2))
    p_value = 1.0 if log_lambda <= 0 else math.exp(-log_lambda)
    return SequentialLift((math.exp(theta - half) - 1.0, math.exp(theta + half) - 1.0), p_value)


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def lift(clicks_t: int, n_t: int, clicks_c: int, n_c: int, z: float = Z95) -> Lift:
    """Relative CTR lift of treatment over control.

    The interval is the delta-method interval of ``log(p_t / p_c)``
    (var ≈ (1−p_t)/(n_t p_t) + (1−p_c)/(n_c p_c)), exponentiated; the p-value
    is the pooled two-proportion z-test. Undefined (None) without clicks in
    both arms.
    """
    if n_t == 0 or n_c == 0 or clicks_t == 0 or clicks_c == 0:
        return Lift(None, None, None)
    p_t, p_c = clicks_t / n_t, clicks_c / n_c
    ratio = p_t / p_c
    se_log = math.sqrt((1 - p_t) / (n_t * p_t) + (1 - p_c) / (n_c * p_c))
    lo, hi = ratio * math.exp(-z * se_log) - 1.0, ratio * math.exp(z * se_log) - 1.0
    pooled = (clicks_t + clicks_c) / (n_t + n_c)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_t + 1 / n_c))
    p_value = 1.0 if se == 0 else 2.0 * _norm_sf(abs(p_t - p_c) / se)
    return Lift(ratio - 1.0, (lo, hi), p_value)


@dataclass(frozen=True, slots=True)
class ArmValue:
    """One arm's value per impression, with a 95% normal interval (None without impressions)."""

    per_impression: float
    ci95: tuple[float, float] | None


def _moments(total: float, sq: float, n: int) -> tuple[float, float]:
    """Mean and (population) variance per impression of values summing to ``total``, squares to ``sq``."""
    mean = total / n
    return mean, max(sq / n - mean * mean, 0.0)


def arm_value(total: float, sq: float, n: int, z: float = Z95) -> ArmValue:
    """Value per impression of an arm whose ``n`` impressions' values sum to ``total`` (squares: ``sq``).

    The interval is ``V ± z·s/√n`` (see the module docstring), clipped at 0: values are never negative.
    """
    if n <= 0:
        return ArmValue(0.0, None)
    mean, var = _moments(total, sq, n)
    half = z * math.sqrt(var / n)
    return ArmValue(mean, (max(0.0, mean - half), mean + half))


def _log_value_ratio(total_t: float, sq_t: float, n_t: int, total_c: float, sq_c: float,
                     n_c: int) -> tuple[float, float, float, float] | None:
    """θ̂ = log(V_t / V_c), its delta-method variance, and the variance of V_t − V_c; None if undefined."""
    if n_t <= 0 or n_c <= 0 or total_t <= 0 or total_c <= 0:
        return None
    (m_t, s_t), (m_c, s_c) = _moments(total_t, sq_t, n_t), _moments(total_c, sq_c, n_c)
    return (math.log(m_t / m_c), s_t / (n_t * m_t * m_t) + s_c / (n_c * m_c * m_c), m_t - m_c,
            s_t / n_t + s_c / n_c)


def value_lift(total_t: float, sq_t: float, n_t: int, total_c: float, sq_c: float, n_c: int,
               z: float = Z95) -> Lift:
    """Relative lift of value per impression, treatment over control, for one look.

    The interval is the delta-method interval of ``log(V_t / V_c)``, exponentiated;
    the p-value is Welch's z-test of ``V_t = V_c``. Undefined (None) without value
    in both arms.
    """
    got = _log_value_ratio(total_t, sq_t, n_t, total_c, sq_c, n_c)
    if got is None:
        return Lift(None, None, None)
    theta, v, diff, v_diff = got
    se = math.sqrt(v)
    p_value = (1.0 if diff == 0 else 0.0) if v_diff <= 0 else 2.0 * _norm_sf(abs(diff) / math.sqrt(v_diff))
    return Lift(math.exp(theta) - 1.0, (math.exp(theta - z * se) - 1.0, math.exp(theta + z * se) - 1.0), p_value)


def sequential_value_lift(total_t: float, sq_t: float, n_t: int, total_c: float, sq_c: float, n_c: int,
                          alpha: float = 0.05, tau: float = MIXING_SD) -> SequentialLift:
    """Always-valid interval of the value lift and p-value of none (mSPRT on ``log(V_t / V_c)``)."""
    got = _log_value_ratio(total_t, sq_t, n_t, total_c, sq_c, n_c)
    if got is None:
        return SequentialLift(None, None)
    return _msprt(got[0], got[1], alpha, tau)
