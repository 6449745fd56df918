"""The serving catalog: ad vectors, bids and a FAISS inner-product index over them.

Ads get dense integer ids (their row in ``vectors``); the index holds only the
active ones, keyed by ``[p, log(bid · r)]`` (``ranker.scoring.retrieval_keys``) so
that one index serves both plain similarity and expected-value retrieval; ``r`` is
the ad's calibration factor as the serving arm's evidence has it (``factors``; 1
until ``rekey`` moves it). Updates are in place, so the catalog is owned by one
event loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from privads.infra.keys import category_hash
from privads.ranker.features import category_id
from privads.ranker.scoring import retrieval_keys, retrieval_query

EXACT_BELOW = 50_000
NPROBES = (8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512, 1024)
TUNE_MARGIN = 0.01  # nprobe is tuned to target + margin on 100 queries, so that held-out recall meets the target


@dataclass(frozen=True)
class IndexInfo:
    """How an index was built and how good it is against exact search."""

    type: str
    size: int
    build_s: float
    recall_at_k: float
    k: int
    nlist: int | None = None
    nprobe: int | None = None
    tuned_on: str = "synthetic"  # "users": a sample of served user posteriors; "synthetic": ``probe_queries``


def probe_queries(keys: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Queries shaped like users: scaled ad directions plus noise, with the bid weight 1.

    Parameters
    ----------
    keys : ndarray, shape (N, D + 1)
    n : int

    Returns
    -------
    ndarray, shape (n, D + 1)
    """
    d = keys.shape[1] - 1
    base = keys[rng.integers(0, keys.shape[0], n), :d]
    users = base * rng.uniform(0.5, 3.0, (n, 1)) + 0.3 * rng.standard_normal((n, d))
    return np.hstack([users, np.ones((n, 1))]).astype(np.float32)


def recall_at_k(index: faiss.Index, exact: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k that ``index`` returns."""
    _, got = index.search(queries, k)
    _, want = exact.search(queries, k)
    shares = [len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum()) for g, w in zip(got, want, strict=True)]
    return float(np.mean(shares))


def user_queries(users: np.ndarray) -> np.ndarray:
    """Retrieval queries ``[u, 1]`` of user posterior means (what ``ServingCatalog.retrieve`` sends).

    Parameters
    ----------
    users : ndarray, shape (n, D)

    Returns
    -------
    ndarray, shape (n, D + 1), float32
    """
    users = np.asarray(users, dtype=np.float32)
    return np.hstack([users, np.ones((users.shape[0], 1), np.float32)])


MIN_USER_QUERIES = 100  # fewer served users than this: tune on synthetic queries instead


def build_index(keys: np.ndarray, ids: np.ndarray, *, exact_below: int = EXACT_BELOW, k: int = 500,
                target_recall: float = 0.95, seed: int = 0,
                users: np.ndarray | None = None) -> tuple[faiss.Index, IndexInfo]:
    """An inner-product index over retrieval keys, chosen by size and checked against exact search.

    Below ``exact_below`` keys the index is exact (Flat). Above, it is IVF with
    ``nlist ≈ 2√n`` lists whose vectors are stored as float16 (``IVF-SQfp16``),
    zero-padded to a multiple of 8 dimensions so that FAISS's SIMD kernels apply:
    half the memory traffic of IVF-Flat, ~30% faster per query at 1M ads for
    about 0.01 less recall at the same nprobe. ``nprobe`` is tuned on one set of
    user-like queries to the smallest value that reaches ``target_recall`` (plus
    a margin) at ``k``, and recall is then measured on another set.

    The queries that matter are the ones served: given a sample of the users'
    posterior means (``users``, at least ``MIN_USER_QUERIES``), ``nprobe`` is
    tuned on half of them and recall measured on the other half. Real users'
    queries are often much easier than synthetic ones (a young user's small
    vector lets the bid decide, and the best-bid lists are probed first), so
    this can cut ``nprobe`` several-fold at the same recall. Without users, the
    synthetic ``probe_queries`` (scaled ad directions plus noise, a harder
    distribution) decide.

    Parameters
    ----------
    keys : ndarray, shape (n, D + 1)
        ``retrieval_keys`` of the ads.
    ids : ndarray of int64, shape (n,)
    users : ndarray, shape (m, D), optional
        Posterior means of served users (the population prior included, if cold users are served).
    """
    start = time.perf_counter()
    n, dim = keys.shape
    if n < exact_below:
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if n:
            flat.add_with_ids(keys, ids)
        return flat, IndexInfo("Flat", n, time.perf_counter() - start, 1.0, k)
    rng = np.random.default_rng(seed)
    nlist = int(2 ** round(np.log2(2 * np.sqrt(n))))
    padded = fit_width(keys, -(-dim // 8) * 8)
    width = padded.shape[1]
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(width), width, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.seed = seed
    index.train(padded[rng.choice(n, min(n, 40 * nlist), replace=False)])
    index.add_with_ids(padded, ids)
    _fast_removal(index)
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(width))
    exact.add_with_ids(padded, ids)
    del padded
    if users is not None and len(users) >= MIN_USER_QUERIES:
        sample = user_queries(users[rng.permutation(len(users))[:1000]])
        half = len(sample) // 2
        tune, check, tuned_on = fit_width(sample[:half], width), fit_width(sample[half:], width), "users"
    else:
        tune, check = (fit_width(probe_queries(keys, m, rng), width) for m in (100, 200))
        tuned_on = "synthetic"
    for nprobe in NPROBES:
        index.nprobe = min(nprobe, nlist)
        if recall_at_k(index, exact, tune, k) >= target_recall + TUNE_MARGIN:
            break
    build_s = time.perf_counter() - start
    recall = recall_at_k(index, exact, check, k)
    return index, IndexInfo("IVF-SQfp16", n, build_s, recall, k, nlist, int(index.nprobe), tuned_on)


def _fast_removal(index: faiss.Index) -> None:
    """An id → list hashtable on an IVF index, so that removing a few ids does not scan every list."""
    # faiss's stub lacks DirectMap (swigfaiss has it: NoMap, Array, Hashtable)
    direct_map = faiss.DirectMap  # type: ignore[attr-defined]
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == direct_map.NoMap:
        index.set_direct_map_type(direct_map.Hashtable)


def fit_width(x: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad the rows of ``x`` (shape (n, m), m ≤ width) to ``width`` columns, float32, C-contiguous."""
    if x.shape[1] == width:
        return np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], width), dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out


@dataclass(frozen=True, slots=True)
class CatalogRows:
    """What a request reads of its candidates' catalog rows, gathered once.

    Each gather from a million-row array is a cache miss per candidate (tens of
    microseconds for 500 of them, a vector gather more), so ``/recommend`` takes
    these once and hands them to the ranker and the slate alike.

    Attributes
    ----------
    rows : ndarray of int64, shape (C,)
    vectors : ndarray of float32, shape (C, D)
    bids : ndarray of float32, shape (C,)
    category_ids, group_ids : ndarray of int64, shape (C,)
    """

    rows: np.ndarray
    vectors: np.ndarray
    bids: np.ndarray
    category_ids: np.ndarray
    group_ids: np.ndarray


class ServingCatalog:
    """Projected ads for retrieval and scoring.

    Parameters
    ----------
    d : int
        Dimension of the projected vectors.
    """

    def __init__(self, d: int, index: faiss.Index | None = None, info: IndexInfo | None = None) -> None:
        self.d = d
        self.ad_ids: list[str] = []
        self.row: dict[str, int] = {}
        self.vectors = np.zeros((0, d), dtype=np.float32)
        self.bids = np.zeros(0, dtype=np.float32)
        self.active = np.zeros(0, dtype=bool)
        self.categories: list[str | None] = []
        self.category_ids = np.zeros(0, dtype=np.int64)  # ranker feature of ``categories``
        self.groups: dict[str | None, int] = {}  # exact category → dense id (the hashed ids collide)
        self.group_ids = np.zeros(0, dtype=np.int64)
        self.factors = np.ones(0, dtype=np.float32)  # the calibration factor in each active ad's key
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(d + 1))
        self.info = info or IndexInfo("Flat", 0, 0.0, 1.0, 500)
        self.mutations = 0  # bumped by every upsert: what was computed from the catalog before is stale
        self._group_hashes: np.ndarray | None = None  # ``group_hashes``, until a group is added

    @property
    def index_type(self) -> str:
        return self.info.type

    @classmethod
    def build(cls, d: int, ad_ids: list[str], vectors: np.ndarray, bids: np.ndarray, active: np.ndarray,
              categories: Sequence[str | None], **index_options: Any) -> ServingCatalog:
        """A catalog whose index is chosen by size (``build_index``) over its active ads."""
        n = len(ad_ids)
        on = np.flatnonzero(active)
        index, info = build_index(retrieval_keys(vectors[on], bids[on]), on.astype(np.int64), **index_options)
        cat = cls(d, index, info)
        cat.ad_ids, cat.row, cat.categories = list(ad_ids), {a: i for i, a in enumerate(ad_ids)}, list(categories)
        cat.vectors = np.asarray(vectors, dtype=np.float32).reshape(n, d)
        cat.bids, cat.active = np.asarray(bids, dtype=np.float32), np.asarray(active, dtype=bool)
        cat._categorise()
        return cat

    def _categorise(self) -> None:
        """Category ids (hashed, for the ranker; exact, for pooling evidence) and unit factors, for every row."""
        self.category_ids = np.array([category_id(c) for c in self.categories], dtype=np.int64)
        self.group_ids = np.array([self._group(c) for c in self.categories], dtype=np.int64)
        self.factors = np.ones(len(self.categories), dtype=np.float32)

    def _group(self, category: str | None) -> int:
        return self.groups.setdefault(category, len(self.groups))

    def group_hashes(self) -> np.ndarray:
        """Each group id's category as the user state keys it (``keys.category_hash``), shape (groups,), uint32."""
        cached = self._group_hashes
        if cached is None or cached.shape[0] != len(self.groups):
            cached = np.zeros(len(self.groups), np.uint32)
            for name, g in self.groups.items():
                cached[g] = category_hash(name)
            self._group_hashes = cached
        return cached

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _grow(self, n: int) -> None:
        cap = self.vectors.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)
        vectors = np.zeros((new, self.d), dtype=np.float32)
        vectors[:cap] = self.vectors
        bids = np.zeros(new, dtype=np.float32)
        bids[:cap] = self.bids
        active = np.zeros(new, dtype=bool)
        active[:cap] = self.active
        cats = np.zeros(new, dtype=np.int64)
        cats[:cap] = self.category_ids[:cap]
        groups = np.zeros(new, dtype=np.int64)
        groups[:cap] = self.group_ids[:cap]
        factors = np.ones(new, dtype=np.float32)
        factors[:cap] = self.factors[:cap]
        self.vectors, self.bids, self.active, self.category_ids = vectors, bids, active, cats
        self.group_ids, self.factors = groups, factors

    def upsert(self, ad_ids: list[str], vectors: np.ndarray, bids: np.ndarray,
               active: np.ndarray, categories: list[str | None]) -> None:
        """Insert or replace ads.

        Parameters
        ----------
        ad_ids : list of str, length n
        vectors : ndarray, shape (n, d)
        bids : ndarray, shape (n,)
        active : ndarray of bool, shape (n,)
        categories : list of str or None, length n
        """
        self.mutations += 1
        last = {a: i for i, a in enumerate(ad_ids)}  # an id twice in one batch: the last one wins
        if len(last) < len(ad_ids):
            keep = sorted(last.values())
            ad_ids = [ad_ids[i] for i in keep]
            categories = [categories[i] for i in keep]
            vectors, bids, active = vectors[keep], bids[keep], active[keep]
        rows = []
        for ad_id, cat in zip(ad_ids, categories, strict=True):
            r = self.row.get(ad_id)
            if r is None:
                r = len(self.ad_ids)
                self.row[ad_id] = r
                self.ad_ids.append(ad_id)
                self.categories.append(cat)
            else:
                self.categories[r] = cat
            rows.append(r)
        rows_a = np.asarray(rows, dtype=np.int64)
        self._grow(len(self.ad_ids))
        was = rows_a[self.active[rows_a]]
        if was.size:
            # faiss's stub says an IDSelector; its Python wrapper (class_wrappers) takes an array of ids too
            self.index.remove_ids(was)  # type: ignore[arg-type]
        self.vectors[rows_a] = vectors
        self.bids[rows_a] = bids
        self.active[rows_a] = active
        self.category_ids[rows_a] = [category_id(c) for c in categories]
        self.group_ids[rows_a] = [self._group(c) for c in categories]
        on = rows_a[active]
        if on.size:
            self._add(on)

    def _add(self, rows: np.ndarray) -> None:
        keys = retrieval_keys(self.vectors[rows], self.bids[rows], self.factors[rows])
        self.index.add_with_ids(fit_width(keys, self.index.d), rows)

    def drifted(self, factors: np.ndarray, tolerance: float) -> np.ndarray:
        """Active rows whose key factor is more than ``tolerance`` away from ``factors`` (shape (N,)) in log.

        What ``rekey`` should move: a small change of a factor barely moves an ad's
        rank, and each re-keyed ad costs a removal and an insertion in the index.
        """
        n = min(len(self.ad_ids), factors.shape[0])  # ads upserted since ``factors`` was computed keep theirs
        on = np.flatnonzero(self.active[:n])
        step = np.abs(np.log(np.maximum(factors[on], 1e-6)) - np.log(np.maximum(self.factors[on], 1e-6)))
        return on[step > tolerance]

    def rekey(self, rows: np.ndarray, factors: np.ndarray) -> None:
        """Give ``rows`` (active) the calibration factors ``factors`` (aligned with ``rows``) in their keys."""
        if rows.size == 0:
            return
        self.mutations += 1
        # faiss's stub says an IDSelector; its Python wrapper (class_wrappers) takes an array of ids too
        self.index.remove_ids(rows.astype(np.int64))  # type: ignore[arg-type]
        self.factors[rows] = factors
        self._add(rows)

    def upsert_entries(self, entries: Sequence[Any], vectors: np.ndarray) -> None:
        """Upsert catalog entries (with ``ad_id``, ``bid``, ``active``, ``category``) and their projected vectors.

        Parameters
        ----------
        entries : sequence of catalog entries, length n
        vectors : ndarray, shape (n, d)
        """
        if not entries:
            return
        self.upsert([e.ad_id for e in entries], vectors, np.array([e.bid for e in entries], dtype=np.float32),
                    np.array([e.active for e in entries], dtype=bool), [e.category for e in entries])

    def search(self, query: np.ndarray, n: int) -> np.ndarray:
        """Rows of the ``n`` active ads with the largest inner product with ``query`` (shape (d,))."""
        return self._search(retrieval_query(query, 0.0), n)

    def retrieve(self, user: np.ndarray, n: int) -> np.ndarray:
        """Rows of the ``n`` active ads with the largest approximate expected value for ``user`` (shape (d,))."""
        return self._search(retrieval_query(user, 1.0), n)

    def _search(self, query: np.ndarray, n: int) -> np.ndarray:
        n = min(n, len(self))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        _, ids = self.index.search(fit_width(query.reshape(1, -1), self.index.d), n)
        return ids[0][ids[0] >= 0]

    def take(self, rows: np.ndarray) -> CatalogRows:
        """The candidates' vectors, bids and categories (``CatalogRows``)."""
        return CatalogRows(rows, self.vectors[rows], self.bids[rows], self.category_ids[rows], self.group_ids[rows])

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """Ad ids of catalog rows."""
        if rows.size == 0:
            return []
        got = itemgetter(*rows.tolist())(self.ad_ids)
        return list(got) if rows.size > 1 else [got]

    def active_rows(self) -> np.ndarray:
        return np.flatnonzero(self.active[: len(self.ad_ids)])

    # --- artifacts -------------------------------------------------------------

    def save(self, directory: Path) -> None:
        n = len(self.ad_ids)
        np.savez(directory / "catalog.npz", vectors=self.vectors[:n], bids=self.bids[:n], active=self.active[:n])
        (directory / "catalog.json").write_text(json.dumps({"ad_ids": self.ad_ids, "categories": self.categories,
                                                            "index": asdict(self.info)}))
        faiss.write_index(self.index, str(directory / "index.faiss"))

    @classmethod
    def load(cls, directory: Path, d: int) -> ServingCatalog:
        """The catalog as saved, with its FAISS index as built (an IVF index is not retrained)."""
        meta = json.loads((directory / "catalog.json").read_text())
        index = faiss.read_index(str(directory / "index.faiss"))
        _fast_removal(index)
        cat = cls(d, index, IndexInfo(**meta["index"]))
        with np.load(directory / "catalog.npz") as z:
            n = len(meta["ad_ids"])
            cat.ad_ids, cat.row, cat.categories = meta["ad_ids"], {a: i for i, a in enumerate(meta["ad_ids"])}, \
                meta["categories"]
            cat.vectors = z["vectors"].astype(np.float32).reshape(n, d)
            cat.bids, cat.active = z["bids"].astype(np.float32), z["active"].astype(bool)
        cat._categorise()
        return cat
