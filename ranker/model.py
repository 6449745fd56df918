"""The learned ranker at serving time: pure numpy inference of a multi-task deep & cross network.

The click logit of a row is split so that Thompson sampling keeps working on top
of the ranker::

    logit = a · (u · p) + h(x) + position_bias[pos]

``h`` is a DCN-v2 network (low-rank cross layers, then an MLP) over the
standardised dense features and the category and context embeddings. At serving
``h`` is evaluated once per candidate with the posterior mean, and ``u · p`` is
replaced by each posterior draw's, so exploration still comes from the user's
uncertainty. A second head predicts ``log(1 + value)`` of a click. With no cross
layers and no hidden layers the same class is plain logistic regression.
Training (torch) lives in ``learner.ranking``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from privads.ranker.features import CONTEXT_BUCKETS, Rows


@dataclass
class RankerModel:
    """Weights of a trained ranker (all float32).

    Attributes
    ----------
    kind : str
        ``"dcn"`` or ``"logistic"`` (the baseline; same class, no cross/hidden layers).
    mean, std : ndarray, shape (F,)
        Standardisation of ``Rows.dense``.
    category_emb : ndarray, shape (CATEGORY_BUCKETS, E)
    context_emb : ndarray, shape (CONTEXT_BUCKETS + 1, E)
        Last row (padding) is zero.
    cross_u, cross_v, cross_b : lists of ndarray, shapes (F0, r), (r, F0), (F0,)
        Low-rank cross layers ``x ← x0 ⊙ (U (V x) + b) + x`` with ``F0 = F + 2E``.
    hidden_w, hidden_b : lists of ndarray, shapes (h_in, h_out), (h_out,)
        ReLU layers after the cross layers.
    click_w, value_w : ndarray, shape (h_last,)
    click_b, value_b : float
    dot_weight : float
        ``a``.
    position_bias : ndarray, shape (MAX_POSITION,)
    """

    kind: str
    mean: np.ndarray
    std: np.ndarray
    category_emb: np.ndarray
    context_emb: np.ndarray
    click_w: np.ndarray
    click_b: float
    value_w: np.ndarray
    value_b: float
    dot_weight: float
    position_bias: np.ndarray
    cross_u: list[np.ndarray] = field(default_factory=list)
    cross_v: list[np.ndarray] = field(default_factory=list)
    cross_b: list[np.ndarray] = field(default_factory=list)
    hidden_w: list[np.ndarray] = field(default_factory=list)
    hidden_b: list[np.ndarray] = field(default_factory=list)

    # --- inference ------------------------------------------------------------------

    def _trunk(self, rows: Rows) -> np.ndarray:
        x0 = np.concatenate([
            (rows.dense - self.mean) / self.std,
            self.category_emb[rows.category],
            self.context_emb[rows.context].sum(axis=1),
        ], axis=1).astype(np.float32, copy=False)
        return self._layers(x0)

    def _layers(self, x0: np.ndarray) -> np.ndarray:
        x = x0
        # in place: each layer allocates only its matmul's output (serving runs this per request)
        for u, v, b in zip(self.cross_u, self.cross_v, self.cross_b, strict=True):
            y = (x @ u) @ v
            y += b
            y *= x0
            y += x
            x = y
        for w, b in zip(self.hidden_w, self.hidden_b, strict=True):
            x = x @ w
            x += b
            np.maximum(x, 0.0, out=x)
        return x

    def candidate_logits(self, rows: Rows) -> np.ndarray:
        """``h(x) + position_bias[0]`` per row: the click logit without the ``a · (u · p)`` term, shape (n,)."""
        return self._trunk(rows) @ self.click_w + (self.click_b + self.position_bias[0])

    def request_logits(self, user: np.ndarray, count: int, ads: np.ndarray, bids: np.ndarray,
                       category: np.ndarray, context: np.ndarray) -> np.ndarray:
        """``candidate_logits`` of one request's candidates, without materialising their ``Rows``.

        Equal to ``candidate_logits(candidate_rows(user, count, ads, bids, category, context))``
        (to float32 rounding), but the columns that are the same for every
        candidate — ``u``, ``log(1 + n)`` and the context embedding — are
        standardised once per request instead of once per candidate.

        Parameters
        ----------
        user : ndarray, shape (D,)
            The user's posterior mean.
        count : int
        ads : ndarray, shape (C, D)
        bids, category : ndarray, shape (C,)
        context : ndarray of int, shape (MAX_CONTEXT_TOKENS,)

        Returns
        -------
        ndarray, shape (C,)
        """
        c, d = ads.shape
        mean, std = self.mean, self.std
        e = self.category_emb.shape[1]
        f = 3 * d + 3
        user = user.astype(np.float32, copy=False)
        x0 = np.empty((c, f + 2 * e), dtype=np.float32)
        # the blocks [u ⊙ p, u, p], standardised, are p ⊙ scale + shift with one (3, D) scale and shift:
        # (u ⊙ p − m) / s = p ⊙ (u / s) − m / s,  (u − m) / s = p ⊙ 0 + (u − m) / s,  (p − m) / s = p ⊙ (1 / s) − m / s
        inv = 1.0 / std[:3 * d].reshape(3, d)
        scale = np.stack([user * inv[0], np.zeros(d, np.float32), inv[2]])
        shift = -mean[:3 * d].reshape(3, d) * inv
        shift[1] += user * inv[1]
        blocks = x0[:, :3 * d].reshape(c, 3, d)
        np.multiply(ads[:, None, :], scale, out=blocks)
        blocks += shift
        x0[:, 3 * d] = (ads @ user - mean[3 * d]) / std[3 * d]
        x0[:, 3 * d + 1] = (0.0 - mean[3 * d + 1]) / std[3 * d + 1]  # not the bid (ranker.features)
        x0[:, 3 * d + 2] = (np.float32(np.log1p(max(count, 0))) - mean[3 * d + 2]) / std[3 * d + 2]
        x0[:, f:f + e] = self.category_emb[category]
        x0[:, f + e:] = self.context_emb[context].sum(axis=0)
        return self._layers(x0) @ self.click_w + (self.click_b + self.position_bias[0])

    def click_logits(self, rows: Rows) -> np.ndarray:
        """Full click logit of each row at its logged position, shape (n,)."""
        return (self._trunk(rows) @ self.click_w + self.click_b + self.dot_weight * rows.dot
                + self.position_bias[rows.position])

    def values(self, rows: Rows) -> np.ndarray:
        """Predicted value of a click, ``exp(head) − 1`` (≥ 0), shape (n,)."""
        return np.maximum(np.expm1(self._trunk(rows) @ self.value_w + self.value_b), 0.0)

    # --- persistence ----------------------------------------------------------------

    def save(self, path: Path) -> None:
        arrays: dict[str, ArrayLike] = {
            "kind": np.array(self.kind), "mean": self.mean, "std": self.std,
            "category_emb": self.category_emb, "context_emb": self.context_emb,
            "click_w": self.click_w, "click_b": np.float32(self.click_b),
            "value_w": self.value_w, "value_b": np.float32(self.value_b),
            "dot_weight": np.float32(self.dot_weight), "position_bias": self.position_bias,
        }
        for name in ("cross_u", "cross_v", "cross_b", "hidden_w", "hidden_b"):
            for i, a in enumerate(getattr(self, name)):
                arrays[f"{name}_{i}"] = a
        # allow_pickle spelled out (its default): else, to mypy, any entry of ``arrays`` could be that flag
        np.savez(path, allow_pickle=True, **arrays)

    @classmethod
    def load(cls, path: Path) -> RankerModel:
        with np.load(path) as z:
            def stack(name: str) -> list[np.ndarray]:
                out, i = [], 0
                while f"{name}_{i}" in z:
                    out.append(z[f"{name}_{i}"].astype(np.float32))
                    i += 1
                return out

            return cls(kind=str(z["kind"]), mean=z["mean"], std=z["std"], category_emb=z["category_emb"],
                       context_emb=z["context_emb"], click_w=z["click_w"], click_b=float(z["click_b"]),
                       value_w=z["value_w"], value_b=float(z["value_b"]), dot_weight=float(z["dot_weight"]),
                       position_bias=z["position_bias"], cross_u=stack("cross_u"), cross_v=stack("cross_v"),
                       cross_b=stack("cross_b"), hidden_w=stack("hidden_w"), hidden_b=stack("hidden_b"))

    def describe(self) -> dict:
        return {"type": self.kind, "cross_layers": len(self.cross_u),
                "hidden": [int(w.shape[1]) for w in self.hidden_w],
                "embedding_dim": int(self.category_emb.shape[1]), "context_buckets": CONTEXT_BUCKETS}
