"""Ranker training (torch): the served deep & cross network, the logistic baseline, and the
two published designs it was chosen against (``privads bench learn``, BENCHMARKS.md).

- ``dcn``: DCN-v2 (low-rank cross layers + MLP), exported to ``ranker.model.RankerModel``
  and served in numpy.
- ``logistic``: the same features, linear (one-hot category/context): the baseline.
- ``transformer``: a two-stage recommender's ranking stage: feature tokens through a
  transformer encoder, then cross layers (scaled to CPU serving).
- ``mns-lsh``: Tencent's ad representations: numeric features (``u·p``, bid, count)
  as Multiple-Numeral-System embeddings, the ad as an LSH HashID (sign bits of ``p``
  under random hyperplanes), MNS-embedded too.

All share ``logit = a · (u·p) + h(x) + position_bias[pos]`` and a value head, are
trained by ``fit`` (AdamW, BCE + λ·MSE on ``log(1+value)`` of clicks with a value),
and are seeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from privads.ranker.features import CATEGORY_BUCKETS, CONTEXT_BUCKETS, MAX_POSITION, Rows
from privads.ranker.model import RankerModel

KINDS = ("dcn", "logistic", "transformer", "mns-lsh")


@dataclass
class LabelledRows:
    """Ranker rows with their outcomes, in time order.

    Attributes
    ----------
    rows : Rows
    clicked : ndarray, shape (n,), float32 in {0, 1}
    value : ndarray, shape (n,), float32; NaN where no value was logged
    group : ndarray, shape (n,), int64
        Request each row belongs to (for NDCG).
    """

    rows: Rows
    clicked: np.ndarray
    value: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray | slice) -> LabelledRows:
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else idx
        return LabelledRows(self.rows.take(idx), self.clicked[idx], self.value[idx], self.group[idx])


# --- modules -----------------------------------------------------------------------


class _Base(nn.Module):
    """Shared parts: standardisation, embeddings, ``a``, position bias, the two heads."""

    # buffers (register_buffer), declared: else they type as ``Tensor | Module`` (nn.Module.__getattr__)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, width: int, mean: np.ndarray, std: np.ndarray, emb: int, head_in: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.category = nn.Embedding(CATEGORY_BUCKETS, emb)
        self.context = nn.Embedding(CONTEXT_BUCKETS + 1, emb, padding_idx=CONTEXT_BUCKETS)
        self.dot_weight = nn.Parameter(torch.ones(()))
        self.position_bias = nn.Parameter(torch.zeros(MAX_POSITION))
        self.click = nn.Linear(head_in, 1)
        self.value = nn.Linear(head_in, 1)
        self.width = width

    def x0(self, dense: torch.Tensor, category: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.cat([(dense - self.mean) / self.std, self.category(category), self.context(context).sum(1)], 1)

    def trunk(self, dense: torch.Tensor, category: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, dot: torch.Tensor, category: torch.Tensor, context: torch.Tensor,
                position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(dense, category, context)
        click = self.click(z).squeeze(1) + self.dot_weight * dot + self.position_bias[position]
        return click, self.value(z).squeeze(1)


class CrossLayer(nn.Module):
    """DCN-v2 low-rank cross: ``x0 ⊙ (U (V x) + b) + x``."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.v = nn.Linear(width, rank, bias=False)
        self.u = nn.Linear(rank, width)
        nn.init.zeros_(self.u.weight)  # starts as the identity map

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.u(self.v(x)) + x


# The served DCN's size: on bench learn's simulated traffic rank 8 with an MLP of 32-16 scored the same AUC as
# rank 32 with 128-64 (within 0.002; see ``dcn_sizes`` in BENCHMARKS.md) at under a third of the serving cost.
DCN_RANK = 8
DCN_HIDDEN = (32, 16)


class DCN(_Base):
    def __init__(self, width: int, mean: np.ndarray, std: np.ndarray, *, emb: int = 8, cross: int = 2,
                 rank: int = DCN_RANK, hidden: tuple[int, ...] = DCN_HIDDEN) -> None:
        f0 = width + 2 * emb
        super().__init__(width, mean, std, emb, hidden[-1] if hidden else f0)
        self.cross = nn.ModuleList(CrossLayer(f0, rank) for _ in range(cross))
        dims = (f0, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    # a ModuleList's items type as plain Modules: these are the layers __init__ put in them
    @property
    def cross_layers(self) -> list[CrossLayer]:
        return [cast(CrossLayer, c) for c in self.cross]

    @property
    def hidden_layers(self) -> list[nn.Linear]:
        return [cast(nn.Linear, h) for h in self.hidden]

    def trunk(self, dense: torch.Tensor, category: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x0 = self.x0(dense, category, context)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return x


class Transformer(_Base):
    """Feature tokens (user, ad, interaction, scalars, category, context) → encoder → cross → MLP."""

    def __init__(self, width: int, mean: np.ndarray, std: np.ndarray, *, d: int = 32, layers: int = 2,
                 heads: int = 4, emb: int = 32) -> None:
        super().__init__(width, mean, std, emb, 64)
        self.dim = (width - 3) // 3
        self.tok_inter = nn.Linear(self.dim, d)
        self.tok_user = nn.Linear(self.dim, d)
        self.tok_ad = nn.Linear(self.dim, d)
        self.tok_scalar = nn.Linear(3, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        enc = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.cross = nn.ModuleList(CrossLayer(7 * d, 16) for _ in range(2))
        self.mlp = nn.Linear(7 * d, 64)

    def trunk(self, dense: torch.Tensor, category: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = (dense - self.mean) / self.std
        d = self.dim
        tokens = torch.stack([
            self.tok_inter(x[:, :d]), self.tok_user(x[:, d:2 * d]), self.tok_ad(x[:, 2 * d:3 * d]),
            self.tok_scalar(x[:, 3 * d:]), self.category(category), self.context(context).sum(1),
        ], 1)
        h = self.encoder(torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)).flatten(1)
        z = h
        for layer in self.cross:
            z = layer(h, z)
        return torch.relu(self.mlp(z))


class MnsLsh(_Base):
    """Tencent's Multiple-Numeral-System embeddings for numbers and LSH HashIDs for ads."""

    BASES = (2, 3, 5, 7)
    LEVELS = 256  # each number is quantised to one of 256 levels before its digits are taken
    planes: torch.Tensor  # buffers, declared (see _Base)
    bit_offset: torch.Tensor

    def __init__(self, width: int, mean: np.ndarray, std: np.ndarray, *, emb: int = 16, bits: int = 16,
                 hidden: tuple[int, ...] = (128, 64), seed: int = 0) -> None:
        super().__init__(width, mean, std, emb, hidden[-1])
        self.dim = (width - 3) // 3
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(self.dim, bits, generator=gen))
        self.digits = [(b, int(np.ceil(np.log(self.LEVELS) / np.log(b)))) for b in self.BASES]
        slots = sum(b * k for b, k in self.digits)
        self.numbers = nn.ModuleList(nn.Embedding(slots, emb) for _ in range(3))
        self.hash_emb = nn.Embedding(2 * bits, emb)  # HashID bits are base-2 digits
        self.register_buffer("bit_offset", torch.arange(bits) * 2)
        dims = (self.dim + 6 * emb, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def mns(self, table: nn.Embedding, v: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(((v + 4.0) / 8.0 * self.LEVELS).long(), 0, self.LEVELS - 1)  # standardised value, ±4σ
        out, offset = torch.zeros(()), 0  # a zero Tensor rather than the int 0: the sum is a Tensor throughout
        for base, n in self.digits:
            r = q
            for k in range(n):
                out = out + table(offset + k * base + r % base)
                r = r // base
            offset += base * n
        return out

    def trunk(self, dense: torch.Tensor, category: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = (dense - self.mean) / self.std
        d = self.dim
        bits = (dense[:, 2 * d:3 * d] @ self.planes > 0).long()
        parts = [x[:, :d], self.hash_emb(self.bit_offset + bits).sum(1), self.category(category),
                 self.context(context).sum(1)]
        # self.numbers holds the nn.Embedding tables of __init__ (a ModuleList's items type as plain Modules)
        parts += [self.mns(cast(nn.Embedding, t), x[:, 3 * d + i]) for i, t in enumerate(self.numbers)]
        z = torch.cat(parts, 1)
        for layer in self.hidden:
            z = torch.relu(layer(z))
        return z


def make_module(kind: str, width: int, mean: np.ndarray, std: np.ndarray, seed: int,
                dcn_size: tuple[int, tuple[int, ...]] | None = None) -> _Base:
    if kind == "dcn":
        rank, hidden = dcn_size or (DCN_RANK, DCN_HIDDEN)
        return DCN(width, mean, std, rank=rank, hidden=hidden)
    if kind == "logistic":
        return DCN(width, mean, std, emb=1, cross=0, hidden=())
    if kind == "transformer":
        return Transformer(width, mean, std)
    if kind == "mns-lsh":
        return MnsLsh(width, mean, std, seed=seed)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --- training ----------------------------------------------------------------------


def _tensors(rows: Rows) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(rows.dense), torch.from_numpy(rows.dot), torch.from_numpy(rows.category),
            torch.from_numpy(rows.context), torch.from_numpy(rows.position))


@dataclass
class Fitted:
    module: _Base
    kind: str
    examples: int
    seconds: float

    @property
    def examples_per_s(self) -> float:
        return self.examples / max(self.seconds, 1e-9)


# learning rates per design (the linear baseline needs larger steps to converge in the same budget)
LEARNING_RATES = {"dcn": 2e-3, "logistic": 1e-2, "transformer": 2e-3, "mns-lsh": 2e-3}


def fit(data: LabelledRows, kind: str = "dcn", *, epochs: int = 3, lr: float | None = None, batch_size: int = 1024,
        weight_decay: float = 1e-5, value_weight: float = 0.5, init: RankerModel | None = None,
        min_steps: int = 400, seed: int = 0, dcn_size: tuple[int, tuple[int, ...]] | None = None) -> Fitted:
    """Train a ranker on labelled rows.

    Parameters
    ----------
    data : LabelledRows
        Training rows (n of them).
    kind : one of ``KINDS``
    epochs, lr, batch_size, weight_decay : AdamW schedule; ``lr`` defaults to ``LEARNING_RATES[kind]``.
    value_weight : float
        λ of the value head's loss (only rows clicked with a logged value count).
    init : RankerModel, optional
        Warm start (``dcn``/``logistic`` of the same shape): the served ranker.
    min_steps : int
        Small datasets get more epochs, so that every model takes at least this many steps.
    seed : int
        Seeds initialisation and shuffling; two runs with the same seed agree.
    dcn_size : (rank, hidden), optional
        Another size for a ``dcn`` than the served one (``DCN_RANK``, ``DCN_HIDDEN``), for comparisons.

    Returns
    -------
    Fitted
        ``examples`` counts rows × epochs; ``seconds`` the wall time of the loop.
    """
    if len(data) == 0:
        raise ValueError("data is empty")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dense = data.rows.dense
    mean = dense.mean(0).astype(np.float32)
    std = np.maximum(dense.std(0), 1e-3).astype(np.float32)
    if init is not None and init.kind == kind and init.mean.shape == mean.shape:
        mean, std = init.mean, init.std
    module = make_module(kind, dense.shape[1], mean, std, seed, dcn_size)
    if init is not None and init.kind == kind:
        _load_numpy(module, init)
    tensors = _tensors(data.rows)
    y = torch.from_numpy(data.clicked.astype(np.float32))
    has_value = np.isfinite(data.value) & (data.clicked > 0)
    v = torch.from_numpy(np.log1p(np.where(has_value, np.maximum(data.value, 0), 0)).astype(np.float32))
    vmask = torch.from_numpy(has_value.astype(np.float32))
    opt = torch.optim.AdamW(module.parameters(), lr=lr or LEARNING_RATES[kind], weight_decay=weight_decay)
    bce = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    module.train()
    epochs = max(epochs, -(-min_steps // -(-len(data) // batch_size)))
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(batch_size):
            click, value = module(*(t[idx] for t in tensors))
            loss = bce(click, y[idx])
            m = vmask[idx]
            if value_weight and m.sum() > 0:
                loss = loss + value_weight * (m * (value - v[idx]) ** 2).sum() / m.sum()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
    module.eval()
    return Fitted(module, kind, len(data) * epochs, time.perf_counter() - start)


def predict_logits(fitted: Fitted, rows: Rows, batch_size: int = 65536) -> np.ndarray:
    """Click logits of a torch ranker at the rows' positions, shape (n,)."""
    out = []
    with torch.inference_mode():
        tensors = _tensors(rows)
        for s in range(0, len(rows), batch_size):
            out.append(fitted.module(*(t[s:s + batch_size] for t in tensors))[0].numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --- export to the numpy serving model -----------------------------------------------


def export(fitted: Fitted) -> RankerModel:
    """The numpy serving form of a ``dcn`` or ``logistic`` ranker."""
    m = fitted.module
    if not isinstance(m, DCN):
        raise ValueError(f"only dcn/logistic rankers are served, not {fitted.kind!r}")

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float32).copy()

    return RankerModel(
        kind=fitted.kind, mean=a(m.mean), std=a(m.std), category_emb=a(m.category.weight),
        context_emb=a(m.context.weight), click_w=a(m.click.weight[0]), click_b=float(m.click.bias.detach()),
        value_w=a(m.value.weight[0]), value_b=float(m.value.bias.detach()), dot_weight=float(m.dot_weight.detach()),
        position_bias=a(m.position_bias),
        cross_u=[a(c.v.weight.T) for c in m.cross_layers], cross_v=[a(c.u.weight.T) for c in m.cross_layers],
        cross_b=[a(c.u.bias) for c in m.cross_layers],
        hidden_w=[a(h.weight.T) for h in m.hidden_layers], hidden_b=[a(h.bias) for h in m.hidden_layers])


def _load_numpy(module: _Base, model: RankerModel) -> None:
    """Copy a served model's weights into a fresh module of the same shape (the warm start)."""
    # a different architecture: train from scratch
    if not isinstance(module, DCN):
        return
    cross, hidden = module.cross_layers, module.hidden_layers
    if len(cross) != len(model.cross_u) or len(hidden) != len(model.hidden_w) or \
            any(h.weight.shape[::-1] != w.shape for h, w in zip(hidden, model.hidden_w, strict=True)) or \
            any(c.v.weight.shape[::-1] != u.shape for c, u in zip(cross, model.cross_u, strict=True)):
        return
    t = torch.from_numpy
    with torch.no_grad():
        module.category.weight.copy_(t(model.category_emb))
        module.context.weight.copy_(t(model.context_emb))
        module.click.weight.copy_(t(model.click_w)[None, :])
        module.click.bias.fill_(model.click_b)
        module.value.weight.copy_(t(model.value_w)[None, :])
        module.value.bias.fill_(model.value_b)
        module.dot_weight.fill_(model.dot_weight)
        module.position_bias.copy_(t(model.position_bias))
        for c, u, v, b in zip(cross, model.cross_u, model.cross_v, model.cross_b, strict=True):
            c.v.weight.copy_(t(u).T)
            c.u.weight.copy_(t(v).T)
            c.u.bias.copy_(t(b))
        for h, w, b in zip(hidden, model.hidden_w, model.hidden_b, strict=True):
            h.weight.copy_(t(w).T)
            h.bias.copy_(t(b))
