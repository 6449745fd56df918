"""Versioned model artifacts under ``PRIVADS_DATA/models/<version>/``.

On a directory, a version is written completely under a temporary name, every
file and the directory flushed to disk (``fsync``), renamed into place and the
rename flushed too, then announced (Redis pointer + ``model-updates``): a
reader never sees half a version, and a crash of the machine after the
announcement cannot leave the pointer naming files that never reached the disk.

On S3 (``PRIVADS_DATA=s3://…``, ``infra.objects``) there is no rename: the version
is built in this host's cache, its files PUT one by one and its manifest last. A
version is one whose manifest exists (``read_manifest``), and it is announced only
after the manifest's PUT returned. Readers on other hosts copy a version into their
own cache once (``version_dir``) and load it from there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privads.infra.objects import Objects, as_objects, fsync_dir
from privads.ranker.index import ServingCatalog
from privads.ranker.model import RankerModel
from privads.ranker.projector import Projector

MANIFEST = "manifest.json"
# the population prior (ranker.updates.population_prior) at the version's build, float32 (D,): versioned so that
# the workers' updates depend on the events and the served version only, never on when they are applied
PRIOR = "prior.npy"
# where a version's projector came from (its manifest's ``projector.fit``): the seeded random map (no catalog
# yet), the catalog's principal directions (``projector.initial_projector``; refit while no user is learned), or
# a trained candidate the learner promoted
RANDOM_FIT, CATALOG_FIT, TRAINED_FIT = "random", "catalog", "trained"
# the ads' evidence as this version's model sees it (``EvidenceOffsets``): per arm and ad, what to add to the
# live clicks and expected clicks so that the calibration factors compare the ad's clicks with what *this*
# model predicts, not with what the model before it predicted
EVIDENCE = "evidence.npz"

# arm → ad id → (clicks, expected clicks) to add to the live counts
EvidenceOffsets = dict[str, dict[str, tuple[float, float]]]


def save_evidence(path: Path, offsets: EvidenceOffsets) -> None:
    """Write ``offsets`` as ``EVIDENCE`` in a version directory."""
    arrays: dict[str, Any] = {}  # Any: numpy's stubs type savez's keywords as its own flags
    for arm, ads in offsets.items():
        ids = list(ads)
        arrays[f"{arm}.ids"] = np.array(ids, dtype=str)
        arrays[f"{arm}.clicks"] = np.array([ads[a][0] for a in ids], np.float64)
        arrays[f"{arm}.expected"] = np.array([ads[a][1] for a in ids], np.float64)
    np.savez(path / EVIDENCE, **arrays)


def load_evidence(path: Path) -> EvidenceOffsets | None:
    """A version's evidence offsets, or None if it has none (its counts are taken as they are)."""
    if not (path / EVIDENCE).exists():
        return None
    with np.load(path / EVIDENCE, allow_pickle=False) as z:
        arms = {name.rsplit(".", 1)[0] for name in z.files}
        return {arm: {str(a): (float(c), float(e)) for a, c, e in
                      zip(z[f"{arm}.ids"].tolist(), z[f"{arm}.clicks"], z[f"{arm}.expected"], strict=True)}
                for arm in arms}


def fit_of(manifest: dict | None) -> str | None:
    """Where a version's projector came from (None: no version, or one written before this was recorded)."""
    return None if manifest is None else manifest.get("projector", {}).get("fit")


def refittable(manifest: dict | None) -> bool:
    """Whether a version's projector is still an initial one (random or fitted to the catalog), not trained."""
    return manifest is None or fit_of(manifest) in (RANDOM_FIT, CATALOG_FIT)


def new_version() -> str:
    """Sortable, unique-enough version name: ``v<unix ms>``."""
    return f"v{int(time.time() * 1000)}"


@dataclass
class ModelVersion:
    """One consistent set of served artifacts."""

    manifest: dict
    projector: Projector
    catalog: ServingCatalog
    ranker: RankerModel | None = None  # None: σ(u·p + b) × bid, the stream's own model
    prior: np.ndarray | None = None  # the population prior a new user starts from (None: the zero vector)
    evidence: EvidenceOffsets | None = None  # added to the live per-ad counts of the arms this version serves

    @property
    def version(self) -> str:
        return self.manifest["version"]


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and every directory holding them (the savers write through their own
    handles: numpy, faiss and torch close their files without an ``fsync``)."""
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(d)
    fsync_dir(path)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_version(models: Objects | Path, projector: Projector, catalog: ServingCatalog, info: dict,
                  ranker: RankerModel | None = None, prior: np.ndarray | None = None,
                  fit: str | None = None, evidence: EvidenceOffsets | None = None) -> dict:
    """Write a version atomically into ``models`` (a directory, or ``Objects`` on S3); returns its manifest.

    ``fit``: where the projector came from (``RANDOM_FIT``, ``CATALOG_FIT``, ``TRAINED_FIT``), recorded as the
    manifest's ``projector.fit``.
    """
    models = as_objects(models)
    models_dir = models.local_path()
    version = new_version()
    while models.exists(f"{version}/{MANIFEST}") or (models_dir is not None and (models_dir / version).exists()):
        version = new_version() + "b"  # two cycles in the same millisecond
    if models_dir is None:
        return _publish_to_objects(models, version, projector, catalog, info, ranker, prior, fit, evidence)
    final = models_dir / version
    tmp = models_dir / f".tmp-{version}"
    tmp.mkdir(parents=True)
    manifest = _write_files(tmp, str(final.resolve()), version, projector, catalog, info, ranker, prior, fit,
                            evidence)
    fsync_tree(tmp)  # the files' data and the directory's entries, before the name makes them a version
    tmp.rename(final)
    fsync_dir(models_dir)  # the rename itself
    fsync_dir(models_dir.parent)  # and the models directory, the first time it was made
    return manifest


def _publish_to_objects(models: Objects, version: str, projector: Projector, catalog: ServingCatalog, info: dict,
                        ranker: RankerModel | None, prior: np.ndarray | None, fit: str | None,
                        evidence: EvidenceOffsets | None) -> dict:
    """``write_version`` on S3: built in this host's cache, PUT file by file, the manifest last (its existence is
    the version's), then kept as the cache's copy."""
    cache = models.cache
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=cache))
    try:
        manifest = _write_files(build, models.url_of(version), version, projector, catalog, info, ranker, prior,
                                fit, evidence)
        models.publish_dir(build, version, last=MANIFEST)
        if cache is not None and not (cache / version).exists():
            build.rename(cache / version)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return manifest


def _write_files(tmp: Path, path: str, version: str, projector: Projector, catalog: ServingCatalog, info: dict,
                 ranker: RankerModel | None, prior: np.ndarray | None, fit: str | None,
                 evidence: EvidenceOffsets | None) -> dict:
    """A version's files in directory ``tmp``, its manifest (naming ``path``) written last; returns the manifest."""
    projector.save(tmp / "projector.npz")
    catalog.save(tmp)
    if ranker is not None:
        ranker.save(tmp / "ranker.npz")
    if prior is not None:
        np.save(tmp / PRIOR, np.asarray(prior, np.float32))
    if evidence is not None:
        save_evidence(tmp, evidence)
    manifest = {
        "version": version,
        "path": path,
        "built_at": time.time(),
        "projector": {"type": "linear", "d_in": int(projector.weight.shape[0]), "d_out": projector.d_user,
                      **({"fit": fit} if fit is not None else {})},
        "ranker": ranker.describe() if ranker is not None else {"type": "thompson-logistic"},
        "index": {"type": catalog.index_type, "size": len(catalog), "ads": len(catalog.ad_ids),
                  "build_s": round(catalog.info.build_s, 3),
                  f"recall_at_{catalog.info.k}": round(catalog.info.recall_at_k, 4),
                  "nlist": catalog.info.nlist, "nprobe": catalog.info.nprobe, "tuned_on": catalog.info.tuned_on},
        **info,
    }
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def on_objects(manifest: dict) -> bool:
    """Whether a version lives on S3 (its manifest's path is a URL), not in a directory."""
    return "://" in str(manifest["path"])


def version_dir(manifest: dict, models: Objects | None = None) -> Path:
    """The local directory of a version's files: its own on a directory, this host's cached copy on S3.

    Raises
    ------
    FileNotFoundError
        If the version is gone (naming it).
    """
    if not on_objects(manifest):
        return Path(manifest["path"])
    if models is None or models.cache is None:
        raise ValueError(f"model version {manifest.get('version')} is on {manifest['path']}: reading it needs the "
                         "models' Objects with a cache (infra.objects.models_of)")
    return models.fetch_dir(str(manifest["version"]))


def write_manifest(manifest: dict, models: Objects | None = None) -> None:
    """Rewrite a written version's manifest (atomically), e.g. with evaluations made on the version as written."""
    text = json.dumps(manifest, indent=1)
    if on_objects(manifest):
        if models is None:
            raise ValueError(f"model version {manifest['version']} is on S3: rewriting its manifest needs models")
        models.put(f"{manifest['version']}/{MANIFEST}", text.encode())
        if models.cache is not None and (models.cache / manifest["version"]).is_dir():
            (models.cache / manifest["version"] / MANIFEST).write_text(text)  # the cached copy: the same files
        return
    path = Path(manifest["path"])
    tmp = path / f".{MANIFEST}.tmp"
    _write_synced(tmp, text)
    tmp.replace(path / MANIFEST)
    fsync_dir(path)


def load_version(manifest: dict, models: Objects | None = None) -> ModelVersion:
    """The artifacts a manifest names, read from its directory (``version_dir``: on S3, ``models``).

    Raises
    ------
    FileNotFoundError
        If the directory is gone (naming it); any other error of a file that cannot be read is raised as it is.
    """
    path = version_dir(manifest, models)
    if not path.is_dir():
        raise FileNotFoundError(f"model version {manifest.get('version')}: directory {path} is missing")
    projector = Projector.load(path / "projector.npz")
    ranker = RankerModel.load(path / "ranker.npz") if (path / "ranker.npz").exists() else None
    return ModelVersion(manifest, projector, ServingCatalog.load(path, projector.d_user), ranker, load_prior(path),
                        load_evidence(path))


def load_prior(path: Path) -> np.ndarray | None:
    """A version's population prior (``PRIOR`` in its directory), or None if it has none."""
    return np.load(path / PRIOR) if (path / PRIOR).exists() else None


def prior_or(prior: np.ndarray | None, default: np.ndarray) -> np.ndarray:
    """Where a user the stream has not learned starts: a version's population prior, else ``default``.

    A prior of another dimension than ``default`` (a version built for other user vectors) is not used.
    """
    return prior if prior is not None and prior.shape == default.shape else default


def read_manifest(models: Objects | Path, version: str) -> dict:
    """The manifest of a published version (e.g. the one a pinned control serves)."""
    models = as_objects(models)
    try:
        manifest = json.loads(models.get(f"{version}/{MANIFEST}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"model version {version!r} not found in {models}") from None
    # where it is now: the data dir may have moved since it was written
    local = models.local_path(version)
    manifest["path"] = str(local.resolve()) if local is not None else models.url_of(version)
    return manifest


def recent_manifests(models: Objects | Path, limit: int) -> list[dict]:
    """The manifests of the newest ``limit`` published versions, oldest first (a version whose manifest cannot be
    read is left out)."""
    models = as_objects(models)
    out = []
    for name in [v for v in models.dirs() if v.startswith("v")][-limit:]:
        try:
            out.append(read_manifest(models, name))
        except (FileNotFoundError, ValueError):  # half-written (no manifest yet), or not JSON
            continue
    return out


def version_summary(manifest: dict, swapped_at: float | None) -> dict[str, Any]:
    """What the dashboard's model timeline shows of a version: its gates' verdicts and figures."""
    evaluation = manifest.get("evaluation", {})

    def gate(kind: str) -> dict[str, Any]:
        e = evaluation.get(kind) or {}
        out = {"trained": bool(e.get("trained")), "promoted": bool(e.get("promoted")), "reason": e.get("reason")}
        for side in ("candidate", "served"):
            if isinstance(e.get(side), dict):
                out[side] = {k: v for k, v in e[side].items() if isinstance(v, (int, float))}
        return out

    return {"version": manifest["version"], "built_at": manifest.get("built_at"), "reason": manifest.get("reason"),
            "changed": manifest.get("changed", []), "projector": gate("projector"), "ranker": gate("ranker"),
            "swapped_at": swapped_at}


def collect_garbage(models: Objects | Path, keep: int, current: str, pinned: str | None = None) -> list[str]:
    """Remove all but the newest ``keep`` versions (never the current or the pinned one); returns the removed.

    On S3, this host's cached copies of the removed versions go too.
    """
    models = as_objects(models)
    versions = [v for v in models.dirs() if v.startswith("v")]
    removed = []
    for name in versions[:-keep] if keep else versions:
        if name not in (current, pinned):
            models.delete_tree(name)
            if models.cache is not None:
                shutil.rmtree(models.cache / name, ignore_errors=True)
            removed.append(name)
    models_dir = models.local_path()
    if models_dir is not None:
        for p in models_dir.glob(".tmp-*"):
            if time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
    return removed
