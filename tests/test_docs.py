"""Docstrings and the docs cite only what is in the repository: files that exist, modules and names that resolve."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "ranker", "streams", "learner", "api", "cli", "bench")
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]

# a path into the checkout: folder/…/file.ext, or a top-level document
FILE = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|toml|yml|html|jsonl|png|ini)|[A-Z][\w-]*\.md)\b")
# ``ranker.scoring`` or ``ranker.scoring.AdEvidence.sample``: a reference to one of our modules
DOTTED = re.compile(r"``((?:{})(?:\.\w+)+)``".format("|".join(PACKAGES)))


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef
                                                                   | ast.ClassDef))]
    return [d for n in nodes if (d := ast.get_docstring(n, clean=False))]


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module("privads." + ".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _file_exists(ref: str, near: Path) -> bool:
    return (REPO / ref).exists() or (near.parent / ref).exists()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_docstrings_cite_files_and_modules_that_exist(path: Path) -> None:
    bad = []
    for doc in _docstrings(path):
        bad += [f for f in FILE.findall(doc) if not _file_exists(f, path)]
        bad += [d for d in DOTTED.findall(doc) if not _resolves(d)]
    assert not bad, f"{path.relative_to(REPO)} cites what is not in the repository: {sorted(set(bad))}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_docs_cite_files_that_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    refs = {f for f in FILE.findall(text) if "/" in f and f.split("/")[0] in PACKAGES + ("docs", "tests", "data")}
    missing = sorted(f for f in refs if not _file_exists(f, path))
    assert not missing, f"{path.name} cites files that do not exist: {missing}"


def test_the_checks_can_fail() -> None:
    assert not _resolves("ranker.scoring.NoSuchThing") and not _resolves("streams.updates")
    assert _resolves("ranker.scoring.AdEvidence.sample") and _resolves("infra.keys")
    assert FILE.findall("see streams/updates.py and DESIGN.md") == ["streams/updates.py", "DESIGN.md"]
    assert not _file_exists("streams/updates.py", REPO / "README.md")
