"""A/B arms and online lift: the pure maths (no I/O).

Users are split by a salted hash of ``user_id`` so that a user stays in one arm.
Lift is ``CTR_treatment / CTR_control − 1`` with a delta-method interval on the
log of the CTR ratio and a two-sided z-test of equal CTRs (two independent
binomial samples; impressions treated as independent trials, which ignores
within-user correlation and so understates the variance when users see many ads).
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
