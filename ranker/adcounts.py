"""The arms' per-ad counts as the API holds them: followed from the workers' log, read per request in memory.

The stream workers own the counts (``adstat:*`` in Redis); the API keeps a copy,
current to within the follower's polling interval (about a second), so that a
request reads its 500 candidates' counts without a round trip. Staleness only
delays how fast a cold ad's Beta posterior narrows; the propensities logged are
those of the policy that ran, counts included.

``AdCounts`` is keyed by ad id; a request indexes by catalog row, so each served
catalog gets a ``RowCounts``: the same counts as arrays aligned with its rows,
patched from ``AdCounts``' journal of changed ids rather than rebuilt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

_ZERO = (0, 0)
JOURNAL = 4096  # applied deltas remembered; a RowCounts further behind than this is rebuilt


class AdCounts:
    """policy → ad id → (clicks, impressions shown), with a journal of which ids changed."""

    def __init__(self) -> None:
        self._arms: dict[str, dict[str, tuple[int, int]]] = {}
        self.version = 0  # bumped by every change
        self._journal: deque[tuple[int, str, tuple[str, ...]]] = deque(maxlen=JOURNAL)
        self._complete_after = 0  # the journal holds every change made after this version

    def reset(self, snapshot: Mapping[str, Mapping[str, Iterable[int]]]) -> None:
        """Replace everything by a snapshot (policy → ad id → [clicks, shown])."""
        self._arms = {p: {a: (int(c), int(n)) for a, (c, n) in ads.items()} for p, ads in snapshot.items()}
        self.version += 1
        self._journal.clear()  # nothing before a reset can be patched from
        self._complete_after = self.version

    def apply(self, delta: Mapping[str, Mapping[str, Iterable[int]]]) -> None:
        """Add one logged batch of increments (policy → ad id → [clicks, shown])."""
        self.version += 1
        for policy, ads in delta.items():
            arm = self._arms.setdefault(policy, {})
            for ad_id, (c, n) in ads.items():
                old_c, old_n = arm.get(ad_id, _ZERO)
                arm[ad_id] = (old_c + int(c), old_n + int(n))
            if len(self._journal) == self._journal.maxlen:
                self._complete_after = self._journal[0][0]  # about to be dropped
            self._journal.append((self.version, policy, tuple(ads)))

    def get(self, policy: str, ad_id: str) -> tuple[int, int]:
        return self._arms.get(policy, {}).get(ad_id, _ZERO)

    def changed_since(self, version: int) -> list[tuple[str, tuple[str, ...]]] | None:
        """(policy, ad ids) changed after ``version``; None when the journal no longer reaches back that far."""
        if version == self.version:
            return []
        if not self._complete_after <= version < self.version:
            return None
        return [(policy, ids) for v, policy, ids in self._journal if v > version]

    def of_arm(self, policy: str) -> dict[str, tuple[int, int]]:
        """Every ad with counts in one arm (a copy)."""
        return dict(self._arms.get(policy, {}))


class Catalog(Protocol):
    """What ``RowCounts`` needs of a catalog: its ids by row and the reverse map."""

    ad_ids: list[str]
    row: dict[str, int]


class RowCounts:
    """One arm's counts aligned with one catalog's rows.

    Parameters
    ----------
    catalog : Catalog
        Rows are appended to as ads are upserted; ``sync`` follows.
    policy : str
        The arm.
    """

    def __init__(self, catalog: Catalog, policy: str) -> None:
        self.catalog = catalog
        self.policy = policy
        self.clicks = np.zeros(0, np.int64)
        self.shown = np.zeros(0, np.int64)
        self.rows = 0
        self.version = -1

    def sync(self, counts: AdCounts) -> None:
        """Bring the arrays up to ``counts`` and to the catalog's current rows."""
        changes = counts.changed_since(self.version) if self.version >= 0 else None
        n = len(self.catalog.ad_ids)
        if changes is None:
            self._rebuild(counts, n)
        else:
            row, rows = self.catalog.row, self.rows
            for policy, ids in changes:
                if policy != self.policy:
                    continue
                for ad_id in ids:
                    r = row.get(ad_id)
                    if r is not None and r < rows:
                        self.clicks[r], self.shown[r] = counts.get(policy, ad_id)
            if n > rows:
                self._grow(n)
                for r in range(rows, n):  # ads added to the catalog since: usually without counts yet
                    c, m = counts.get(self.policy, self.catalog.ad_ids[r])
                    if c or m:
                        self.clicks[r], self.shown[r] = c, m
        self.rows, self.version = n, counts.version

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts of catalog ``rows`` (shape (C,)): clicks and impressions shown, int64."""
        return self.clicks[rows], self.shown[rows]

    def _grow(self, n: int) -> None:
        cap = self.clicks.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)
        for name in ("clicks", "shown"):
            old = getattr(self, name)
            grown = np.zeros(new, np.int64)
            grown[:cap] = old
            setattr(self, name, grown)

    def _rebuild(self, counts: AdCounts, n: int) -> None:
        self.clicks = np.zeros(max(n, 1024), np.int64)
        self.shown = np.zeros(max(n, 1024), np.int64)
        row = self.catalog.row
        for ad_id, (c, m) in counts.of_arm(self.policy).items():
            r = row.get(ad_id)
            if r is not None and r < n:
                self.clicks[r], self.shown[r] = c, m
