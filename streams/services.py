"""What the agents call: each class reads state, calls the pure maths, writes state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np

from privads.infra.keys import category_hash
from privads.infra.loops import Step, reason_of
from privads.infra.objects import models_of
from privads.infra.records import Ad
from privads.infra.settings import Settings
from privads.infra.store import CatalogStore, ModelPointer
from privads.ranker.artifacts import load_prior, version_dir
from privads.ranker.encoder import AdEncoder, encoder_input
from privads.ranker.projector import Projector, initial_projector

log = logging.getLogger(__name__)


class CatalogIndexer:
    """Encode ads (their category and text, ``encoder_input``; cached by its hash) and store them."""

    def __init__(self, catalog: CatalogStore, encoder: AdEncoder) -> None:
        self.catalog = catalog
        self.encoder = encoder

    async def upsert(self, ads: Sequence[Ad]) -> int:
        """Store ads; returns how many texts had to be encoded."""
        latest = {a.ad_id: a for a in ads}  # within a batch the last upsert wins
        ads = list(latest.values())
        inputs = [encoder_input(a.text, a.category) for a in ads]
        hashes = [self.encoder.hash(t) for t in inputs]
        cached = await self.catalog.cached_embeddings(hashes)
        todo = {h: t for t, h, c in zip(inputs, hashes, cached, strict=True) if c is None}
        new: dict[str, np.ndarray] = {}
        if todo:
            loop = asyncio.get_running_loop()
            vecs = await loop.run_in_executor(None, self.encoder.encode, list(todo.values()))
            new = dict(zip(todo.keys(), vecs, strict=True))
        # the cached ones are written again with their ads: one the learner's sweep deleted since the read comes back
        known = {h: np.frombuffer(c, dtype="<f4") for h, c in zip(hashes, cached, strict=True) if c is not None}
        await self.catalog.upsert(ads, hashes, {**known, **new})
        return len(new)


class AdVectors:
    """Projected ad vectors under the served projector, cached per model version, and its population prior."""

    def __init__(self, settings: Settings, catalog: CatalogStore, pointer: ModelPointer) -> None:
        self.settings = settings
        self.catalog = catalog
        self.pointer = pointer
        self.models = models_of(settings)  # where the versions are (on S3: with this host's cache)
        self.version: str | None = None
        self.projector: Projector = initial_projector(settings.d_ad, settings.d_user, settings.seed)
        self.prior: np.ndarray | None = None  # the served version's population prior
        self.cache: dict[str, np.ndarray] = {}
        self.category: dict[str, int] = {}  # ad id → its category's hash (``keys.category_hash``), as last read
        self.skipped: tuple[str, str] | None = None  # (version, reason): the pointer's version, unreadable
        self._skip_step: Step | None = None

    async def refresh(self) -> None:
        """Follow the served model version (the learner publishes, workers read).

        A version whose projector cannot be read is skipped, not raised: the workers
        keep projecting with the last good one (``skipped`` names the bad one and why;
        logged once), retry it with backoff, and try a newer version as soon as the
        pointer names it. A Redis error reading the pointer is raised (the timers retry).
        """
        manifest = await self.pointer.get()
        if manifest is None or manifest["version"] == self.version:
            self.skipped, self._skip_step = None, None
            return
        version = manifest["version"]
        if self.skipped is not None and self.skipped[0] != version:
            self.skipped, self._skip_step = None, None  # another version now: try it at once
        if self._skip_step is not None and not self._skip_step.due():
            return
        def load() -> tuple[Projector, np.ndarray | None]:
            path = version_dir(manifest, self.models)  # on S3: this host's copy, fetched once
            return Projector.load(path / "projector.npz"), load_prior(path)

        try:
            projector, prior = await asyncio.to_thread(load)
        except Exception as e:  # noqa: BLE001 - a bad version must not stop the workers' updates
            if self._skip_step is None:
                self._skip_step = Step(f"loading the projector of model {version} (the workers keep projecting "
                                       f"with {self.version or 'the initial projector'})", log, base_s=2.0, max_s=60.0)
            self._skip_step.failed(e)
            self.skipped = (version, reason_of(e))
            return
        if self._skip_step is not None:
            self._skip_step.succeeded()
        self.skipped, self._skip_step = None, None
        self.projector, self.prior, self.version = projector, prior, version
        self.cache.clear()
        log.info("workers now project ads with model %s", self.version)

    async def get(self, ad_ids: Sequence[str]) -> dict[str, np.ndarray]:
        missing = [a for a in dict.fromkeys(ad_ids) if a not in self.cache]
        if missing:
            entries, emb = await self.catalog.read(missing)
            if entries:
                for e, v in zip(entries, self.projector.project(emb), strict=True):
                    self.cache[e.ad_id] = v
                    self.category[e.ad_id] = category_hash(e.category)
        return {a: self.cache[a] for a in ad_ids if a in self.cache}

    def category_hashes(self, ad_ids: Sequence[str]) -> np.ndarray:
        """The categories (``keys.category_hash``) of ads ``get`` has read, shape (n,), uint32 (0: unknown)."""
        return np.array([self.category.get(a, 0) for a in ad_ids], dtype=np.uint32)
