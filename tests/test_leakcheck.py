"""The run-level process check (``tests/leakcheck.py``), in nested pytest runs: it fails a run that leaves a process
behind, even an orphan re-parented to init, kills it, and passes a run that stops what it starts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

LEAKY = '''
import subprocess
from pathlib import Path


def test_starts_an_orphan_and_leaves_it(tmp_path):
    # `sh` starts `sleep` in the background and exits: the sleep is re-parented to init, out of pytest's sight
    out = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    Path({pidfile!r}).write_text(out.stdout.strip())
'''

TIDY = '''
import subprocess
from pathlib import Path


def test_starts_a_child_and_stops_it():
    p = subprocess.Popen(["sleep", "300"])
    Path({pidfile!r}).write_text(str(p.pid))
    try:
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
'''


def nested_run(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``source`` as a test file in a pytest of its own with the plugin loaded; returns it and its child's pid."""
    pidfile = tmp_path / "child.pid"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this directory's run: not the project's configuration
    (tmp_path / "test_nested.py").write_text(source.format(pidfile=str(pidfile)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "leakcheck", "-p", "no:cacheprovider", "-q",
                           "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_nested.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, int(pidfile.read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting to be reaped


def test_a_run_that_leaves_an_orphan_running_fails_names_it_and_kills_it(tmp_path: Path) -> None:
    proc, pid = nested_run(tmp_path, LEAKY)
    try:
        out = proc.stdout + proc.stderr
        assert "1 passed" in out, out[-2000:]  # the test itself passed: the check failed the run
        assert proc.returncode == 1, out[-2000:]
        assert "processes left behind" in out and f"pid {pid}: sleep 300" in out, out[-2000:]
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the check did not kill the process it reported"
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_a_run_that_stops_what_it_starts_passes(tmp_path: Path) -> None:
    proc, pid = nested_run(tmp_path, TIDY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "processes left behind" not in out, out[-2000:]
    assert not alive(pid)
