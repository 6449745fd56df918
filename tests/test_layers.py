"""The import layers of docs/architecture.md are enforced: ``lint-imports`` passes on the code and fails on an
upward import (run on a copy of the package, so the checkout is never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _copy(tmp: Path) -> Path:
    """The package as ``tmp/privads`` (the checkout's folders are its subpackages)."""
    shutil.copytree(REPO, tmp / "privads", ignore=shutil.ignore_patterns(
        ".*", "build", "tests", "data", "docs", "__pycache__", "*.egg-info"))
    return tmp / "privads"


def _lint(tmp: Path) -> subprocess.CompletedProcess[str]:
    # run in tmp: `privads` resolves to the copy, before the checkout's editable install
    return subprocess.run([str(LINT), "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=tmp,
                          env={**os.environ, "PYTHONPATH": str(tmp)}, capture_output=True, text=True, timeout=120)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return _copy(tmp_path)


def test_the_code_keeps_every_contract(package: Path) -> None:
    out = _lint(package.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(("module", "upward", "contract"), [
    ("infra/keys.py", "import privads.ranker.scoring", "foundation"),
    ("ranker/scoring.py", "import privads.streams.attribution", "Layers"),
    ("streams/attribution.py", "import privads.learner.evaluation", "Layers"),
    ("api/deps.py", "import privads.bench.audience", "runtime"),
    ("learner/cycle.py", "import privads.cli.main", "Nothing imports the CLI"),
    ("ranker/updates.py", "import redis", "Pure maths"),
])
def test_an_upward_import_breaks_the_build(package: Path, module: str, upward: str, contract: str) -> None:
    path = package / module
    path.write_text(path.read_text() + f"\n{upward}  # noqa\n")
    out = _lint(package.parent)
    assert out.returncode != 0
    broken = out.stdout[out.stdout.index("Broken contracts"):]
    assert contract.lower() in broken.lower() and upward.split()[-1] in broken, out.stdout
