"""The API's copy of the per-ad counts: deltas by id, arrays by catalog row, patched from the journal."""

from __future__ import annotations

import numpy as np

from privads.ranker import adcounts
from privads.ranker.adcounts import AdCounts, RowCounts


class _Catalog:
    def __init__(self, ids: list[str]) -> None:
        self.ad_ids = list(ids)
        self.row = {a: i for i, a in enumerate(ids)}

    def add(self, ad_id: str) -> None:
        self.row[ad_id] = len(self.ad_ids)
        self.ad_ids.append(ad_id)


def _expected(counts: AdCounts, cat: _Catalog, policy: str) -> tuple[list[int], list[int], list[float]]:
    got = [counts.get(policy, a) for a in cat.ad_ids]
    return [c for c, _, _ in got], [n for _, n, _ in got], [e / 1e6 for _, _, e in got]


def test_row_counts_follow_deltas_new_rows_and_resets() -> None:
    counts = AdCounts()
    counts.reset({"treatment": {"b": [1, 4, 250_000]}, "control": {"a": [9, 9, 9]}})
    cat = _Catalog(["a", "b", "c"])
    rc = RowCounts(cat, "treatment")
    rc.sync(counts)
    rows = np.arange(3)
    assert [x.tolist() for x in rc.take(rows)] == [[0, 1, 0], [0, 4, 0], [0.0, 0.25, 0.0]]
    # a log entry of [clicks, shown] only (written before the expected clicks were counted) adds no expected
    counts.apply({"treatment": {"c": [2, 3], "b": [0, 1, 50_000]}, "control": {"c": [5, 5, 0]}})
    assert counts.get("treatment", "b") == (1, 5, 300_000) and counts.get("treatment", "c") == (2, 3, 0)
    cat.add("d")
    counts.apply({"treatment": {"d": [1, 1, 1], "unknown-ad": [7, 7, 7]}})
    rc.sync(counts)
    assert [x.tolist() for x in rc.take(np.arange(4))] == [list(v) for v in _expected(counts, cat, "treatment")]
    assert rc.take(np.arange(4))[0].tolist() == [0, 1, 2, 1]
    counts.reset({"treatment": {"a": [3, 3, 3_000_000]}})  # a fresh snapshot: nothing is patched from before it
    rc.sync(counts)
    assert rc.take(np.arange(4))[1].tolist() == [3, 0, 0, 0]
    assert rc.take(np.arange(4))[2].tolist() == [3.0, 0, 0, 0]


def test_row_counts_rebuild_when_the_journal_no_longer_reaches_back(monkeypatch) -> None:
    monkeypatch.setattr(adcounts, "JOURNAL", 3)
    counts = AdCounts()
    cat = _Catalog([f"ad{i}" for i in range(10)])
    rc = RowCounts(cat, "treatment")
    rc.sync(counts)
    assert counts.changed_since(rc.version) == []
    for i in range(6):  # more batches than the journal holds
        counts.apply({"treatment": {f"ad{i}": [1, 2, 100_000]}})
    assert counts.changed_since(rc.version) is None
    rc.sync(counts)
    assert [x.tolist() for x in rc.take(np.arange(10))] == [list(v) for v in _expected(counts, cat, "treatment")]
    counts.apply({"treatment": {"ad9": [0, 5, 500_000]}})
    assert counts.changed_since(rc.version) == [("treatment", ("ad9",))]
    rc.sync(counts)
    assert rc.take(np.array([9]))[1].tolist() == [5]
    assert rc.take(np.array([9]))[2].tolist() == [0.5]
