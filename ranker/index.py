"""The serving catalog: ad vectors, bids and a FAISS inner-product index over them.

Ads get dense integer ids (their row in ``vectors``); the index holds only the
active ones, keyed by ``[p, log bid]`` (``ranker.scoring.retrieval_keys``) so that
one index serves both plain similarity and expected-value retrieval. Updates
are in place, so the catalog is owned by one event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ranker.scoring import retrieval_keys, retrieval_query


class ServingCatalog:
    """Projected ads for retrieval and scoring.

    Parameters
    ----------
    d : int
        Dimension of the projected vectors.
    """

    def __init__(self, d: int) -> None:
        self.d = d
        self.ad_ids: list[str] = []
        self.row: dict[str, int] = {}
        self.vectors = np.zeros((0, d), dtype=np.float32)
        self.bids = np.zeros(0, dtype=np.float32)
        self.active = np.zeros(0, dtype=bool)
        self.categories: list[str | None] = []
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(d + 1))

    @property
    def index_type(self) -> str:
        return "Flat"

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
        self.vectors, self.bids, self.active = vectors, bids, active

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
        last = {a: i for i, a in enumerate(ad_ids)}  # an id twice in one batch: the last one wins
        if len(last) < len(ad_ids):
            keep = sorted(last.values())
            ad_ids = [ad_ids[i] for i in keep]
            categories = [categories[i] for i in keep]
            vectors, bids, active = vectors[keep], bids[keep], active[keep]
        rows = []
        for ad_id, cat in zip(ad_ids, categories):
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
            self.index.remove_ids(was)
        self.vectors[rows_a] = vectors
        self.bids[rows_a] = bids
        self.active[rows_a] = active
        on = rows_a[active]
        if on.size:
            self.index.add_with_ids(retrieval_keys(self.vectors[on], self.bids[on]), on)

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
        _, ids = self.index.search(query.reshape(1, -1), n)
        return ids[0][ids[0] >= 0]

    def active_rows(self) -> np.ndarray:
        return np.flatnonzero(self.active[: len(self.ad_ids)])

    # --- artifacts -------------------------------------------------------------

    def save(self, directory: Path) -> None:
        n = len(self.ad_ids)
        np.savez(directory / "catalog.npz", vectors=self.vectors[:n], bids=self.bids[:n], active=self.active[:n])
        (directory / "catalog.json").write_text(json.dumps({"ad_ids": self.ad_ids, "categories": self.categories}))

    @classmethod
    def load(cls, directory: Path, d: int) -> "ServingCatalog":
        meta = json.loads((directory / "catalog.json").read_text())
        cat = cls(d)
        with np.load(directory / "catalog.npz") as z:
            if meta["ad_ids"]:
                cat.upsert(meta["ad_ids"], z["vectors"], z["bids"], z["active"], meta["categories"])
        return cat
