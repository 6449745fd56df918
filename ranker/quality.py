"""Online quality watch (river): how well the served model predicts outcomes as they arrive.

Prequential: every labelled impression is scored with the user's state *before*
it learns from it, ``p = σ(u·p(ad) + b)``, then compared with the outcome.
Rolling AUC and log-loss summarise the last ``window`` examples; an ADWIN
detector on the per-example log-loss flags a change in the stream (drift), which
asks the learner for an early cycle.

A click is labelled as soon as it joins its impression, a negative only when its
attribution window closes (``streams/attribution.py``): for the first window of a
stream the watch sees clicks only. AUC and log-loss are reported only once the
rolling window holds both outcomes (None before): a window of positives alone has
no AUC, and its log-loss would say nothing of the model.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np


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
        # imported here, not with the module: river's drift package loads its datasets, and with them scikit-learn,
        # scipy and pandas (1.3 s of every process start here); the API only needs histogram_quantile
        from river import drift, metrics, utils

        self.auc = utils.Rolling(metrics.ROCAUC, window_size=window, n_thresholds=50)
        self.loss = utils.Rolling(metrics.LogLoss, window_size=window)
        self.adwin = drift.ADWIN(delta=delta)
        self.examples = 0
        self.drifts = 0
        self._window: deque[bool] = deque(maxlen=window)  # the rolling metrics' outcomes, to know both are there
        self._positives = 0

    def update(self, y: np.ndarray, p: np.ndarray) -> int:
        """Feed outcomes ``y`` (shape (n,)) and predicted click probabilities ``p`` (shape (n,)); returns new drifts."""
        found = 0
        for yi, pi in zip(np.asarray(y, dtype=bool).tolist(), np.clip(p, 1e-7, 1 - 1e-7).tolist(), strict=True):
            self.auc.update(yi, pi)
            self.loss.update(yi, pi)
            self.adwin.update(-math.log(pi) if yi else -math.log(1 - pi))
            if len(self._window) == self._window.maxlen:
                self._positives -= self._window[0]
            self._window.append(yi)
            self._positives += yi
            if self.adwin.drift_detected:
                found += 1
        self.examples += len(y)
        self.drifts += found
        return found

    def snapshot(self) -> QualitySnapshot:
        if not 0 < self._positives < len(self._window):  # no example yet, or one outcome only (see the docstring)
            return QualitySnapshot(self.examples, None, None, self.drifts)
        # the wrapped metrics (.obj), typed: Rolling forwards .get to them through a __getattr__ typed as object
        return QualitySnapshot(self.examples, float(self.auc.obj.get()), float(self.loss.obj.get()), self.drifts)


Bound = TypeVar("Bound", int, float)


def histogram_quantile(hist: Mapping[Bound, int], q: float) -> float | None:
    """The ``q`` quantile of a histogram of counts per upper bound (the stream's freshness, ``keys.FRESHNESS``; the
    API's request latency): the smallest bound whose cumulative count reaches ``q`` of the total; None when empty."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for bound in sorted(hist):
        seen += hist[bound]
        if seen >= q * total:
            return float(bound)
    return float(max(hist))
