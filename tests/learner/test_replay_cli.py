"""``privads replay`` end to end on files: the Open Bandit Dataset sample, and logs without propensities."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import obd_dir

OBD = obd_dir()
needs_obd = pytest.mark.skipif(OBD is None, reason="Open Bandit Dataset sample not found: install obp==0.4.1")


def privads(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privads", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def errors(stderr: str) -> list[str]:
    """stderr's lines but the progress stages (``privads: …``, infra/progress.py) written before the failure."""
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith("privads: ")]


def report(*args: str) -> dict:
    proc = privads("replay", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _obd_columns(policy: str) -> dict[str, np.ndarray]:
    assert OBD is not None
    with open(OBD / policy / "all" / "all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"click": np.array([float(r["click"]) for r in rows]),
            "pscore": np.array([float(r["propensity_score"]) for r in rows])}


@needs_obd
def test_uniform_policy_on_the_bts_logs_reproduces_the_closed_form_ips_and_snips() -> None:
    out = report(str(OBD / "bts" / "all" / "all.csv"), "--format", "obd", "--policy", "uniform",
                 "--estimators", "ips,snips")
    cols = _obd_columns("bts")
    ips_cf = float(np.mean(cols["click"] * (1 / 80) / cols["pscore"]))
    snips_cf = float(np.sum(cols["click"] / cols["pscore"]) / np.sum(1 / cols["pscore"]))
    assert out["rows"] == 10_000 and out["actions"] == 80 and out["positions"] == 3
    ips, snips = out["estimators"]["ips"], out["estimators"]["snips"]
    assert ips["estimate"] == pytest.approx(ips_cf, abs=1e-6) and snips["estimate"] == pytest.approx(snips_cf, abs=1e-6)
    for r in (ips, snips):
        assert r["ci_method"] == "normal" and r["ci_lo"] < r["estimate"] < r["ci_hi"]
        assert r["ess"] == pytest.approx(340.378, abs=1e-3) and any("pscore < 0.001" in w for w in r["warnings"])


@needs_obd
def test_every_estimator_runs_on_both_obd_logs_and_the_random_logs_give_the_on_policy_ctr() -> None:
    for policy in ("bts", "random"):
        out = report(str(OBD / policy / "all" / "all.csv"), "--policy", "uniform")  # .csv: obd by extension
        assert set(out["estimators"]) == {"replay", "ips", "snips", "dm", "dr"}
        for r in out["estimators"].values():
            assert r["ci_lo"] <= r["estimate"] <= r["ci_hi"], r
        replay_warns = " ".join(out["estimators"]["replay"]["warnings"])
        assert ("not uniform" in replay_warns) == (policy == "bts")
    # the random logs are uniform over the 80 items: the uniform policy's IPS and SNIPS are the logged CTR, 38/10,000
    rnd = report(str(OBD / "random" / "all" / "all.csv"), "--policy", "uniform", "--estimators", "ips,snips")
    assert rnd["logged_mean_reward"] == pytest.approx(0.0038)
    for r in rnd["estimators"].values():
        assert r["estimate"] == pytest.approx(0.0038, abs=1e-12) and r["ess"] == pytest.approx(10_000)
    logged = report(str(OBD / "bts" / "all" / "all.csv"), "--policy", "logged", "--estimators", "ips,snips,dr")
    for r in logged["estimators"].values():  # the sanity check: the logging policy's own CTR, 42/10,000
        assert r["estimate"] == pytest.approx(0.0042, abs=1e-9)


def _write_log(path: Path, with_propensity: bool) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(300):
            for pos in range(2):
                f.write(json.dumps({"event_id": f"e{i}-{pos}", "ts": 1e9 + i, "user_id": f"u{i % 7}",
                                    "ad_id": f"ad-{rng.integers(5)}", "position": pos,
                                    "propensity": 0.2 if with_propensity else None, "policy": "treatment",
                                    "request_id": f"r{i}", "clicked": int(rng.random() < 0.1), "value": 0.0}) + "\n")


def test_a_log_without_propensities_is_refused_by_the_ips_family_with_one_line(tmp_path: Path) -> None:
    log = tmp_path / "no-pscore.jsonl"
    _write_log(log, with_propensity=False)
    proc = privads("replay", str(log), "--policy", "uniform", "--estimators", "ips,snips")
    assert proc.returncode != 0 and proc.stdout == ""
    lines = errors(proc.stderr)
    assert len(lines) == 1 and "ips, snips: 600 of 600 rows have no logged propensity" in lines[0]
    # the estimators that need none still run on it
    out = report(str(log), "--policy", "popularity", "--estimators", "dm")
    assert out["propensities_logged"] == 0 and out["estimators"]["dm"]["estimate"] >= 0


@pytest.mark.parametrize(("args", "message"), [
    (["missing.jsonl", "--policy", "uniform"], "missing.jsonl: no such file"),
    (["{log}", "--policy", "uniform", "--estimators", "ips,magic"], "--estimators: unknown ['magic']"),
    (["{log}", "--policy", "no-such-version"], "no embedded redis-server is running"),
    (["{log}", "--policy", "uniform", "--format", "obd"], "not the Open Bandit Dataset layout"),
])
def test_bad_arguments_fail_with_one_line_naming_them(tmp_path: Path, args: list[str], message: str) -> None:
    log = tmp_path / "ok.jsonl"
    _write_log(log, with_propensity=True)
    proc = privads("replay", *[a.replace("{log}", str(log)) for a in args], cwd=tmp_path)
    assert proc.returncode != 0
    lines = errors(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_replay_says_what_it_does_on_stderr_and_quiet_silences_it(tmp_path: Path) -> None:
    log = tmp_path / "ok.jsonl"
    _write_log(log, with_propensity=True)
    loud = privads("replay", str(log), "--policy", "uniform", "--estimators", "ips,snips", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert json.loads(loud.stdout)["rows"] == 600  # the report alone on stdout
    assert f"privads: replay: reading {log}" in loud.stderr and "privads: replay: 600 rows read" in loud.stderr
    assert "privads: replay: ips, snips on 600 rows, analytic intervals" in loud.stderr
    quiet = privads("replay", str(log), "--policy", "uniform", "--estimators", "ips,snips", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and json.loads(quiet.stdout) == json.loads(loud.stdout)
    assert "privads:" not in quiet.stderr
