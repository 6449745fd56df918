"""Offline evaluation and the promotion gate: the pure maths (numpy only).

The learner scores a candidate model and the served one on the same
time-based holdout, and promotes the candidate only if it is not worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-7


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half).

    Parameters
    ----------
    y : ndarray of {0, 1}, shape (n,)
    score : ndarray, shape (n,)

    Returns
    -------
    float
        In [0, 1]; NaN when only one class is present.
    """
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # ranks are 1-based
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [1e-7, 1 − 1e-7]), shape (n,)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ndcg_at_k(groups: np.ndarray, y: np.ndarray, score: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over groups (requests) that have at least one positive.

    Parameters
    ----------
    groups : ndarray, shape (n,)
        Group (request) id of each row.
    y : ndarray of {0, 1}, shape (n,)
    score : ndarray, shape (n,)
    k : int
    """
    groups, y, score = np.asarray(groups), np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    if groups.size == 0:
        return float("nan")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))

    def dcg(order: np.ndarray) -> np.ndarray:
        # rank of each row within its group after ``order`` (groups contiguous), then the discounted sum per group
        g, rel = groups[order], y[order]
        starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
        rank = np.arange(g.size) - np.repeat(starts, np.diff(np.r_[starts, g.size]))
        gain = np.where(rank < k, rel * discounts[np.minimum(rank, k - 1)], 0.0)
        return np.add.reduceat(gain, starts)

    ranked = dcg(np.lexsort((np.arange(groups.size), -score, groups)))  # ties keep row order
    ideal = dcg(np.lexsort((-y, groups)))
    has_pos = ideal > 0
    return float(np.mean(ranked[has_pos] / ideal[has_pos])) if has_pos.any() else float("nan")


@dataclass(frozen=True)
class Scores:
    """A model's scores on a holdout."""

    auc: float
    log_loss: float
    ndcg_at_10: float | None = None


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties given their average rank, shape (n,)."""
    order = np.argsort(x, kind="mergesort")
    edges = np.r_[0, np.flatnonzero(np.diff(x[order])) + 1, x.shape[0]]
    ranks = np.empty(x.shape[0])
    ranks[order] = np.repeat((edges[:-1] + 1 + edges[1:]) / 2.0, np.diff(edges))
    return ranks


def auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``AUC(a) − AUC(b)`` on the same rows, and its standard error (DeLong, DeLong & Clarke-Pearson, 1988).

    The two models' AUCs are correlated (same rows), so the error of their difference
    comes from the paired structural components, computed with midranks as in Sun &
    Xu's fast form (IEEE Signal Processing Letters, 2014).

    Parameters
    ----------
    y : ndarray, shape (n,)
        Labels in {0, 1}.
    a, b : ndarray, shape (n,)
        The two models' scores.

    Returns
    -------
    difference, standard error : float
        ``nan`` for both when ``y`` has a single class.
    """
    y = np.asarray(y) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    v01, v10, aucs = [], [], []
    for s in (np.asarray(a, np.float64), np.asarray(b, np.float64)):
        pos, neg = s[y], s[~y]
        tz = _midranks(np.r_[pos, neg])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v01.append((tz[:m] - _midranks(pos)) / n)  # per positive: the share of negatives it outranks
        v10.append(1.0 - (tz[m:] - _midranks(neg)) / m)  # per negative: the share of positives above it
    sx = np.cov(np.vstack(v01)) if m > 1 else np.zeros((2, 2))
    sy = np.cov(np.vstack(v10)) if n > 1 else np.zeros((2, 2))
    var = (sx[0, 0] + sx[1, 1] - 2 * sx[0, 1]) / m + (sy[0, 0] + sy[1, 1] - 2 * sy[0, 1]) / n
    return float(aucs[0] - aucs[1]), float(np.sqrt(max(var, 0.0)))


PROMOTE_Z = 1.645  # a change of model is made only on a gain one-sided 5% significant on the holdout


def gate(candidate: Scores, served: Scores | None, *, auc_tolerance: float = 0.002,
         log_loss_tolerance: float = 0.002, auc_se: float | None = None, z: float = PROMOTE_Z) -> Verdict:
    """Promote a candidate unless it is worse than the served model on the same holdout.

    Worse means AUC lower by more than ``auc_tolerance`` or log-loss higher by
    more than ``log_loss_tolerance`` (the tolerances absorb evaluation noise, so
    the served model does not flap between equals). A candidate with an
    undefined AUC (a one-class holdout) is never promoted.

    With ``auc_se``, the standard error of the AUC difference on this holdout
    (``auc_difference``), a candidate must also be *better*: its AUC gain at least
    ``z`` standard errors. Replacing a served model is not free (a new projector
    moves every ad against users learned in the old space; a new ranker rescales the
    ads' evidence), and a small early holdout can show a gain of 0.007 AUC from noise.
    """
    if not np.isfinite(candidate.auc):
        return Verdict(False, "holdout has a single class: AUC undefined")
    if served is None:
        return Verdict(True, "nothing served yet")
    if candidate.auc < served.auc - auc_tolerance:
        return Verdict(False, f"AUC {candidate.auc:.4f} < served {served.auc:.4f} - {auc_tolerance}")
    if candidate.log_loss > served.log_loss + log_loss_tolerance:
        return Verdict(False, f"log-loss {candidate.log_loss:.4f} > served {served.log_loss:.4f} "
                              f"+ {log_loss_tolerance}")
    if auc_se is not None and np.isfinite(auc_se) and candidate.auc - served.auc < z * auc_se:
        return Verdict(False, f"AUC gain {candidate.auc - served.auc:+.4f} over served {served.auc:.4f} is within "
                              f"the holdout's noise ({z} × SE {auc_se:.4f})")
    return Verdict(True, f"AUC {candidate.auc:.4f} vs {served.auc:.4f}, log-loss {candidate.log_loss:.4f} "
                         f"vs {served.log_loss:.4f}" + (f", SE of the gain {auc_se:.4f}" if auc_se is not None else ""))
