"""Projector training with the users frozen (the seeds' "Phase 2: freeze users, align ads").

The stream owns the user vectors; the learner only fits the map from ad-text
space into the user space, so that ``σ(u · normalise(x W + b) + b₀)`` predicts
clicks. It warm-starts from the served projector and pays an L2 price for moving
away from it, so the space the users live in drifts slowly.
"""

from __future__ import annotations

import numpy as np
import torch

from privads.ranker.projector import Projector


def train_projector(
    ads: np.ndarray,
    users: np.ndarray,
    clicked: np.ndarray,
    init: Projector,
    *,
    bias: float,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 1024,
    anchor: float = 1e-3,
    seed: int = 0,
) -> Projector:
    """Fit a linear projector on labelled impressions.

    Parameters
    ----------
    ads : ndarray, shape (n, d_ad)
        Text embeddings of the ads shown.
    users : ndarray, shape (n, d_user)
        The (frozen) user vectors at training time.
    clicked : ndarray of {0, 1}, shape (n,)
    init : Projector
        The served projector: the starting point and the L2 anchor.
    bias : float
        Global logit offset (as served).
    epochs, lr, batch_size : training schedule (Adam).
    anchor : float
        Weight of ``‖W − W₀‖² + ‖b − b₀‖²``.
    seed : int
        Seeds the shuffling; two runs with the same seed agree.

    Returns
    -------
    Projector
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(ads, dtype=np.float32))
    u = torch.from_numpy(np.ascontiguousarray(users, dtype=np.float32))
    y = torch.from_numpy(np.asarray(clicked, dtype=np.float32))
    w0, b0 = torch.from_numpy(init.weight.copy()), torch.from_numpy(init.bias.copy())
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = x.shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            p = torch.nn.functional.normalize(x[idx] @ w + b, dim=1)
            logits = (u[idx] * p).sum(1) + bias
            loss = loss_fn(logits, y[idx]) + anchor * (((w - w0) ** 2).sum() + ((b - b0) ** 2).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Projector(weight=w.detach().numpy().astype(np.float32), bias=b.detach().numpy().astype(np.float32))
