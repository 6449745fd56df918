"""Ranker features: one definition for training (the learner) and serving (the API). Pure numpy.

A row is one (user, ad) pair in one request:

- ``dense``: ``[u ⊙ p, u, p, u·p, 0, log(1 + n)]``, shape ``(3D + 3,)``, where
  ``u`` is the user's posterior mean (the stream owns it), ``p`` the projected ad
  vector and ``n`` the number of labelled impressions the user has been updated with.
  The column that held ``log bid`` is 0: a click model must not see the bid. Ads
  are ranked by ``pCTR × bid``; a pCTR that falls with the bid (learned where high
  bids belong to ads few click, as the sample catalog's do beside an audience's)
  damps every bid in the ranking, and lets an advertiser's bid change its predicted
  quality. The column is kept so that the layout and saved rankers stay the same;
- ``dot``: ``u · p``, kept apart because serving replaces it with a Thompson draw;
- ``category``: the ad's category hashed into ``CATEGORY_BUCKETS``;
- ``context``: up to ``MAX_CONTEXT_TOKENS`` ``key=value`` tokens of the request
  context hashed into ``CONTEXT_BUCKETS`` (padding is ``CONTEXT_BUCKETS``);
- ``position``: 0 = top, capped at ``MAX_POSITION − 1``; used in training only
  (serving scores every candidate as if at the top, so position bias does not
  leak into the ranking).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

CATEGORY_BUCKETS = 64
CONTEXT_BUCKETS = 256
MAX_CONTEXT_TOKENS = 8
MAX_POSITION = 20


def bucket(token: str, buckets: int) -> int:
    """Stable hash bucket of a token (CRC32: the same in every process, unlike ``hash``)."""
    return zlib.crc32(token.encode()) % buckets


def category_id(category: str | None) -> int:
    """Bucket of an ad's category; ``None`` has its own bucket (0)."""
    return 0 if category is None else 1 + bucket(category, CATEGORY_BUCKETS - 1)


def context_ids(context: dict[str, Any] | None) -> np.ndarray:
    """Hashed ``key=value`` tokens of a request context, padded; shape (MAX_CONTEXT_TOKENS,).

    Scalars (str, int, bool) become tokens, in key order; floats, lists and nested
    objects are ignored (they would need binning the ranker cannot know).
    """
    out = np.full(MAX_CONTEXT_TOKENS, CONTEXT_BUCKETS, dtype=np.int64)
    if context:
        tokens = [f"{k}={v}" for k, v in sorted(context.items())
                  if isinstance(v, (str, int, bool)) and not isinstance(v, float)]
        for i, t in enumerate(tokens[:MAX_CONTEXT_TOKENS]):
            out[i] = bucket(t, CONTEXT_BUCKETS)
    return out


def dense_width(d_user: int) -> int:
    return 3 * d_user + 3


@dataclass
class Rows:
    """Ranker inputs for ``n`` rows.

    Attributes
    ----------
    dense : ndarray, shape (n, 3D + 3), float32
    dot : ndarray, shape (n,), float32
    category : ndarray, shape (n,), int64
    context : ndarray, shape (n, MAX_CONTEXT_TOKENS), int64
    position : ndarray, shape (n,), int64
    """

    dense: np.ndarray
    dot: np.ndarray
    category: np.ndarray
    context: np.ndarray
    position: np.ndarray

    def __len__(self) -> int:
        return int(self.dot.shape[0])

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(self.dense[idx], self.dot[idx], self.category[idx], self.context[idx], self.position[idx])


def build_rows(users: np.ndarray, counts: np.ndarray, ads: np.ndarray, bids: np.ndarray,
               category: np.ndarray, context: np.ndarray, position: np.ndarray) -> Rows:
    """Features of ``n`` (user, ad) rows.

    Parameters
    ----------
    users : ndarray, shape (n, D)
        User posterior means.
    counts : ndarray, shape (n,)
        Labelled impressions each user has been updated with.
    ads : ndarray, shape (n, D)
        Projected ad vectors.
    bids : ndarray, shape (n,)
        Not a feature (the click model does not see the bid); accepted so that every
        caller passes a request's candidates the same way.
    category : ndarray of int, shape (n,)
        From ``category_id``.
    context : ndarray of int, shape (n, MAX_CONTEXT_TOKENS)
        From ``context_ids``.
    position : ndarray of int, shape (n,)

    Returns
    -------
    Rows
    """
    users = users.astype(np.float32, copy=False)
    ads = ads.astype(np.float32, copy=False)
    n, d = ads.shape
    dense = np.empty((n, dense_width(d)), dtype=np.float32)
    np.multiply(users, ads, out=dense[:, :d])
    dense[:, d:2 * d] = users
    dense[:, 2 * d:3 * d] = ads
    dot = dense[:, :d].sum(axis=1)
    dense[:, 3 * d] = dot
    dense[:, 3 * d + 1] = 0.0  # not the bid: see the module docstring
    dense[:, 3 * d + 2] = np.log1p(np.maximum(counts, 0))
    return Rows(dense, dot, np.asarray(category, dtype=np.int64), np.asarray(context, dtype=np.int64),
                np.minimum(np.asarray(position, dtype=np.int64), MAX_POSITION - 1))


def candidate_rows(user: np.ndarray, count: int, ads: np.ndarray, bids: np.ndarray,
                   category: np.ndarray, context: np.ndarray) -> Rows:
    """Features of one request's ``C`` candidates (one user, one context, all at position 0).

    Parameters
    ----------
    user : ndarray, shape (D,)
    count : int
    ads : ndarray, shape (C, D)
    bids, category : ndarray, shape (C,)
    context : ndarray of int, shape (MAX_CONTEXT_TOKENS,)
    """
    c = ads.shape[0]
    return build_rows(np.broadcast_to(user, ads.shape), np.full(c, count), ads, bids, category,
                      np.repeat(context[None, :], c, axis=0), np.zeros(c, dtype=np.int64))
