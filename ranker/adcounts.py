"""The arms' per-ad counts as the API holds them: followed from the workers' log, read per request in memory.

The stream workers own the counts (``adstat:*`` in Redis); the API keeps a copy,
current to within the follower's polling interval (about a second), so that a
request reads its 500 candidates' counts without a round trip. Staleness only
delays how fast an ad's calibration posterior narrows; the propensities logged
are those of the policy that ran, counts included.

Per ad and arm: clicks, impressions shown, and the clicks the served model
predicted for them, in millionths (``keys.EXPECTED_SCALE``), all exact integers.

``AdCounts`` is keyed by ad id; a request indexes by catalog row, so each served
catalog gets a ``RowCounts``: the same counts as arrays aligned with its rows,
patched from ``AdCounts``' journal of changed ids rather than rebuilt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from privads.infra.keys import EXPECTED_SCALE

_ZERO = (0, 0, 0)
JOURNAL = 4096  # applied deltas remembered; a RowCounts further behind than this is rebuilt


class AdCounts:
    """policy → ad id → (clicks, shown, µ-expected), with a journal of which ids changed."""

    def __init__(self) -> None:
        self._arms: dict[str, dict[str, tuple[int, int, int]]] = {}
        self.version = 0  # bumped by every change
        self._journal: deque[tuple[int, str, tuple[str, ...]]] = deque(maxlen=JOURNAL)
        self._complete_after = 0  # the journal holds every change made after this version

    def reset(self, snapshot: Mapping[str, Mapping[str, Iterable[int]]]) -> None:
        """Replace everything by a snapshot (policy → ad id → [clicks, shown, µ-expected])."""
        self._arms = {p: {a: _triple(v) for a, v in ads.items()} for p, ads in snapshot.items()}
        self.version += 1
        self._journal.clear()  # nothing before a reset can be patched from
        self._complete_after = self.version

    def apply(self, delta: Mapping[str, Mapping[str, Iterable[int]]]) -> None:
        """Add one logged batch of increments (policy → ad id → [clicks, shown, µ-expected])."""
        self.version += 1
        for policy, ads in delta.items():
            arm = self._arms.setdefault(policy, {})
            for ad_id, v in ads.items():
                c, n, e = _triple(v)
                old_c, old_n, old_e = arm.get(ad_id, _ZERO)
                arm[ad_id] = (old_c + c, old_n + n, old_e + e)
            if len(self._journal) == self._journal.maxlen:
                self._complete_after = self._journal[0][0]  # about to be dropped
            self._journal.append((self.version, policy, tuple(ads)))

    def get(self, policy: str, ad_id: str) -> tuple[int, int, int]:
        return self._arms.get(policy, {}).get(ad_id, _ZERO)

    def changed_since(self, version: int) -> list[tuple[str, tuple[str, ...]]] | None:
        """(policy, ad ids) changed after ``version``; None when the journal no longer reaches back that far."""
        if version == self.version:
            return []
        if not self._complete_after <= version < self.version:
            return None
        return [(policy, ids) for v, policy, ids in self._journal if v > version]

    def of_arm(self, policy: str) -> dict[str, tuple[int, int, int]]:
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
    offset : mapping of ad id → (clicks, expected clicks), optional
        Added to the live counts: the served version's view of the ads' evidence
        (``ranker.artifacts.EVIDENCE``), so that a promoted model's calibration starts
        from what it predicts rather than from what the model before it predicted.
        Impressions are never offset (the popularity control reads them raw).
    """

    def __init__(self, catalog: Catalog, policy: str, offset: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.catalog = catalog
        self.policy = policy
        self.offset = dict(offset or {})
        self.clicks = np.zeros(0, np.int64)
        self.shown = np.zeros(0, np.int64)
        self.expected = np.zeros(0, np.float64)  # in clicks
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
                        self._set(r, counts.get(policy, ad_id), ad_id)
            if n > rows:
                self._grow(n)
                for r in range(rows, n):  # ads added to the catalog since: usually without counts yet
                    ad_id = self.catalog.ad_ids[r]
                    got = counts.get(self.policy, ad_id)
                    if any(got) or ad_id in self.offset:
                        self._set(r, got, ad_id)
        self.rows, self.version = n, counts.version

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts of catalog ``rows`` (shape (C,)): clicks and shown (int64), expected clicks (float64)."""
        return self.clicks[rows], self.shown[rows], self.expected[rows]

    def _set(self, r: int, counts: tuple[int, int, int], ad_id: str) -> None:
        dc, de = self.offset.get(ad_id, (0.0, 0.0))
        # never below 0: the live counts only grow from the snapshot the offset was taken against
        self.clicks[r], self.shown[r] = max(0, counts[0] + round(dc)), counts[1]
        self.expected[r] = max(0.0, counts[2] / EXPECTED_SCALE + de)

    def _grow(self, n: int) -> None:
        cap = self.clicks.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)
        for name in ("clicks", "shown", "expected"):
            old = getattr(self, name)
            grown = np.zeros(new, old.dtype)
            grown[:cap] = old
            setattr(self, name, grown)

    def _rebuild(self, counts: AdCounts, n: int) -> None:
        self.clicks = np.zeros(max(n, 1024), np.int64)
        self.shown = np.zeros(max(n, 1024), np.int64)
        self.expected = np.zeros(max(n, 1024), np.float64)
        row = self.catalog.row
        live = counts.of_arm(self.policy)
        for ad_id in live.keys() | self.offset.keys():
            r = row.get(ad_id)
            if r is not None and r < n:
                self._set(r, live.get(ad_id, _ZERO), ad_id)


def _triple(v: Iterable[int]) -> tuple[int, int, int]:
    """[clicks, shown] (a log written before the expected clicks were counted) or [clicks, shown, µ-expected]."""
    t = tuple(int(x) for x in v)
    return (t[0], t[1], t[2] if len(t) > 2 else 0)
