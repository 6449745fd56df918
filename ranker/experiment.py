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
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

TREATMENT = "treatment"
CONTROL = "control"
ARMS = (TREATMENT, CONTROL)
Z95 = 1.959963984540054


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
    theta = math.log(p_t / p_c)
    v = (1 - p_t) / (n_t * p_t) + (1 - p_c) / (n_c * p_c)
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
