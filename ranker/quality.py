"""Online quality watch (river): how well the served model predicts outcomes as they arrive.

Prequential: every labelled impression is scored with the user's state *before*
it learns from it, ``p = σ(u·p(ad) + b)``, then compared with the outcome.
Rolling AUC and log-loss summarise the last ``window`` examples; an ADWIN
detector on the per-example log-loss flags a change in the stream (drift), which
asks the learner for an early cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from river import drift, metrics, utils


@dataclass(frozen=True)
class QualitySnapshot:
    examples: int
    auc: float | None
    log_loss: float | None
    drifts: int


class QualityWatch:
    """Rolling AUC / log-loss of served predictions and an ADWIN drift detector on the loss.

    Parameters
    ----------
    window : int
        Examples in the rolling metrics.
    delta : float
        ADWIN's confidence: smaller detects fewer, surer changes.
    """

    def __init__(self, window: int = 10_000, delta: float = 0.002) -> None:
        self.auc = utils.Rolling(metrics.ROCAUC, window_size=window, n_thresholds=50)
        self.loss = utils.Rolling(metrics.LogLoss, window_size=window)
        self.adwin = drift.ADWIN(delta=delta)
        self.examples = 0
        self.drifts = 0

    def update(self, y: np.ndarray, p: np.ndarray) -> int:
        """Feed outcomes ``y`` (shape (n,)) and predicted click probabilities ``p`` (shape (n,)); returns new drifts."""
        found = 0
        for yi, pi in zip(np.asarray(y, dtype=bool).tolist(), np.clip(p, 1e-7, 1 - 1e-7).tolist(), strict=True):
            self.auc.update(yi, pi)
            self.loss.update(yi, pi)
            self.adwin.update(-math.log(pi) if yi else -math.log(1 - pi))
            if self.adwin.drift_detected:
                found += 1
        self.examples += len(y)
        self.drifts += found
        return found

    def snapshot(self) -> QualitySnapshot:
        if not self.examples:
            return QualitySnapshot(0, None, None, 0)
        # the wrapped metrics (.obj), typed: Rolling forwards .get to them through a __getattr__ typed as object
        return QualitySnapshot(self.examples, float(self.auc.obj.get()), float(self.loss.obj.get()), self.drifts)


def histogram_quantile(hist: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile of a histogram of counts per upper bound (the stream's freshness, ``keys.FRESHNESS``):
    the smallest bound whose cumulative count reaches ``q`` of the total; None when it is empty."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for bound in sorted(hist):
        seen += hist[bound]
        if seen >= q * total:
            return float(bound)
    return float(max(hist))
