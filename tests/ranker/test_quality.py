"""The online quality watch on synthetic streams with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from privads.learner.evaluation import auc, log_loss
from privads.ranker.quality import QualityWatch


def stream(n: int, ctr_of_p, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    p = rng.uniform(0.01, 0.3, n)
    return (rng.random(n) < ctr_of_p(p)).astype(int), p


# calibrated predictions on a stable stream: no drift, and the rolling figures agree with the exact ones
def test_stable_calibrated_stream_has_no_drift_and_matching_metrics():
    rng = np.random.default_rng(0)
    y, p = stream(6000, lambda p: p, rng)
    w = QualityWatch(window=2000)
    assert w.update(y, p) == 0
    snap = w.snapshot()
    assert snap.examples == 6000 and snap.drifts == 0
    assert snap.log_loss == pytest.approx(log_loss(y[-2000:], p[-2000:]), rel=1e-6)
    assert snap.auc == pytest.approx(auc(y[-2000:], p[-2000:]), abs=0.03)  # river's ROCAUC bins thresholds


# the world changes (clicks stop following the model): ADWIN flags it soon after, and loss rises
def test_an_abrupt_change_is_detected():
    rng = np.random.default_rng(1)
    y1, p1 = stream(5000, lambda p: p, rng)
    y2, p2 = stream(5000, lambda p: np.full_like(p, 0.6), rng)  # everyone clicks far more than predicted
    w = QualityWatch(window=1000)
    assert w.update(y1, p1) == 0
    before = w.snapshot().log_loss
    assert w.update(y2, p2) >= 1
    assert w.snapshot().log_loss > before + 0.3
    assert QualityWatch().snapshot().auc is None  # nothing seen yet


def test_no_auc_nor_log_loss_while_the_window_holds_one_outcome_only():
    # clicks join at once, negatives at their window's close: a stream's first examples are all positives
    q = QualityWatch(window=100)
    q.update(np.ones(30, bool), np.full(30, 0.05))
    snap = q.snapshot()
    assert snap.examples == 30 and snap.auc is None and snap.log_loss is None
    q.update(np.zeros(10, bool), np.full(10, 0.01))  # the negatives arrive: both outcomes in the window
    snap = q.snapshot()
    assert snap.auc == pytest.approx(1.0) and snap.log_loss is not None and snap.log_loss > 0
    q.update(np.zeros(100, bool), np.full(100, 0.01))  # the positives roll out of the window
    assert q.snapshot().auc is None and q.snapshot().examples == 140
