"""A pytest plugin: the run fails if any process it started is still running when it ends.

At configure time the run puts a unique marker in its own environment; every child
inherits it (and its children theirs, including ones reparented to init when their
parent died, and ones in a session of their own), so ``/proc/*/environ`` names
every process the run started, however it was started. When the session ends
(after every fixture's teardown) any such process still alive is reported by pid
and command line, killed, and the run's exit status is set to "tests failed".

Loaded by ``tests/conftest.py`` (``pytest_plugins``); ``-p leakcheck`` loads it
into any other run (``tests/test_leakcheck.py`` does, in a nested run).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARK = "PRIVADS_TEST_RUN_MARK"  # not read by Settings: it reads only its own fields' names
GRACE_S = 5.0  # a child SIGTERMed by a teardown may still be exiting (its own children first)


def marked(value: str) -> list[int]:
    """PIDs (other than this one) of the live processes whose environment holds ``MARK=value``."""
    needle = f"\0{MARK}={value}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            # a zombie's environ reads empty: it is dead, waiting for its parent to reap it
            if needle in b"\0" + Path(f"/proc/{entry}/environ").read_bytes() + b"\0":
                found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        argv = "?"
    return f"pid {pid}: {argv[:300]}"


_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "dist", "no") != "no":  # an xdist controller: each worker checks its own
        return
    # always a new one: a run started by another run (tests/test_leakcheck.py) checks only its own children
    value = uuid.uuid4().hex
    os.environ[MARK] = value
    config.stash[_KEY] = value


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish, which tears down the last fixtures
def pytest_sessionfinish(session: pytest.Session) -> None:
    value = session.config.stash.get(_KEY, None)
    if value is None:
        return
    deadline = time.monotonic() + GRACE_S
    left = marked(value)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = marked(value)
    if not left:
        return
    names = [describe(pid) for pid in left]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = [f"{len(left)} process(es) started by this test run outlived it (killed now):", *names,
             "a fixture or test started them without stopping them in a finally / after its yield"]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "processes left behind", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines))
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
