"""``privads bench cycle``: a real learner cycle over a generated archive, timed and measured; bad input fails."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from privads.bench.cycle import bench_cycle
from privads.infra.settings import Settings

pytestmark = pytest.mark.integration


def test_a_small_cycle_trains_on_the_window_and_reports_its_time_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recording(**kwargs: str) -> str:  # the bench passes its prefix only
        made.append(Path(mkdtemp(**kwargs)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    out = bench_cycle(Settings(), 30_000, days=2.0, ads=200, users=2000, seed=3)
    assert (out["impressions"], out["ads"], out["users"], out["days"]) == (30_000, 200, 2000, 2.0)
    assert out["archive_bytes"] > 0 and out["generate_s"] > 0
    assert out["cycle_s"] > 0 and out["cycle_peak_rss_mib"] > 0
    assert 0 < out["clicks"] < 30_000
    # two days sit inside the week's window; only the attribution window's newest half hour is unsettled
    assert 0.95 * 30_000 < out["window_impressions"] < 30_000
    assert out["examples"] == out["window_impressions"]  # every user has a state, every ad an embedding
    assert out["projector_trained"] and out["ranker_trained"], out
    assert 0 < out["holdout"] < out["examples"] and out["ranker_holdout_auc"] > 0.5
    assert len(made) == 1 and not made[0].exists()  # the temp dir (broker, Redis, archive, models) is gone


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_a_non_positive_size_fails_with_one_line(bad: str) -> None:
    r = subprocess.run([sys.executable, "-m", "privads", "bench", "cycle", "--impressions", bad],
                       capture_output=True, text=True, timeout=120, env=os.environ)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines == [f"privads bench: --impressions must be ≥ 1, got {bad}"], r.stderr
    assert r.stdout == ""
