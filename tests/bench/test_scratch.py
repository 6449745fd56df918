"""A bench's scratch directory goes when the bench succeeds and stays, for its logs, when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from privads.bench.scratch import scratch_dir


def test_removed_after_a_run_that_returns_and_kept_after_one_that_raises(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with scratch_dir("bench-ok-") as ok:
        (ok / "logs").mkdir()
        (ok / "logs" / "worker.log").write_text("fine")
    assert not ok.exists()
    with pytest.raises(RuntimeError), scratch_dir("bench-failed-") as failed:
        (failed / "worker.log").write_text("why it failed")
        raise RuntimeError("the workers never owned their partitions")
    assert (failed / "worker.log").read_text() == "why it failed"
    assert [p.name for p in tmp_path.iterdir()] == [failed.name]
