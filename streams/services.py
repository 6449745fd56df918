"""What the agents call: each class reads state, calls the pure maths, writes state."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infra.settings import Settings
from infra.store import CatalogStore, ModelPointer, UserStore
from learner.encoder import AdEncoder, text_hash
from learner.projector import Projector, initial_projector
from streams.records import Ad, Labelled
from streams.updates import UpdateParams, logit, update_user

log = logging.getLogger(__name__)


class CatalogIndexer:
    """Encode ad texts (cached by text hash) and store the ads."""

    def __init__(self, catalog: CatalogStore, encoder: AdEncoder) -> None:
        self.catalog = catalog
        self.encoder = encoder

    async def upsert(self, ads: Sequence[Ad]) -> int:
        """Store ads; returns how many texts had to be encoded."""
        latest = {a.ad_id: a for a in ads}  # within a batch the last upsert wins
        ads = list(latest.values())
        hashes = [text_hash(a.text) for a in ads]
        cached = await self.catalog.cached_embeddings(hashes)
        todo = {h: a.text for a, h, c in zip(ads, hashes, cached) if c is None}
        new: dict[str, np.ndarray] = {}
        if todo:
            loop = asyncio.get_running_loop()
            vecs = await loop.run_in_executor(None, self.encoder.encode, list(todo.values()))
            new = dict(zip(todo.keys(), vecs))
        await self.catalog.upsert(ads, hashes, new)
        return len(new)


class AdVectors:
    """Projected ad vectors under the served projector, cached per model version."""

    def __init__(self, settings: Settings, catalog: CatalogStore, pointer: ModelPointer) -> None:
        self.settings = settings
        self.catalog = catalog
        self.pointer = pointer
        self.version: str | None = None
        self.projector: Projector = initial_projector(settings.d_ad, settings.d_user, settings.seed)
        self.cache: dict[str, np.ndarray] = {}

    async def refresh(self) -> None:
        """Follow the served model version (the learner publishes, workers read)."""
        manifest = await self.pointer.get()
        if manifest is None or manifest["version"] == self.version:
            return
        path = Path(manifest["path"]) / "projector.npz"
        self.projector = Projector.load(path)
        self.version = manifest["version"]
        self.cache.clear()
        log.info("workers now project ads with model %s", self.version)

    async def get(self, ad_ids: Sequence[str]) -> dict[str, np.ndarray]:
        missing = [a for a in dict.fromkeys(ad_ids) if a not in self.cache]
        if missing:
            entries, emb = await self.catalog.read(missing)
            if entries:
                for e, v in zip(entries, self.projector.project(emb)):
                    self.cache[e.ad_id] = v
        return {a: self.cache[a] for a in ad_ids if a in self.cache}


class UserLearner:
    """Apply labelled impressions to users' posteriors, one read and one write per batch."""

    def __init__(self, settings: Settings, users: UserStore, ads: AdVectors) -> None:
        self.users = users
        self.ads = ads
        self.d = settings.d_user
        self.prior_precision = settings.prior_precision
        self.prior_mean = np.zeros(settings.d_user, dtype=np.float32)
        self.params = UpdateParams(
            learning_rate=settings.learning_rate, max_step=settings.max_step,
            l2_prior=settings.l2_prior, bias=logit(settings.base_rate),
        )
        self.skipped_unknown_ad = 0

    async def apply(self, examples: Sequence[Labelled]) -> int:
        """Returns the number of examples applied."""
        by_user: dict[str, list[Labelled]] = defaultdict(list)
        for ex in examples:
            by_user[ex.user_id].append(ex)
        user_ids = list(by_user)
        states, erased, vectors = await asyncio.gather(
            self.users.get_many(user_ids), self.users.erased_at(user_ids),
            self.ads.get([ex.ad_id for ex in examples]),
        )
        applied = 0
        new_states = {}
        for uid, state, erased_ts in zip(user_ids, states, erased):
            exs = [ex for ex in by_user[uid] if ex.ad_id in vectors and (erased_ts is None or ex.ts > erased_ts)]
            self.skipped_unknown_ad += sum(1 for ex in by_user[uid] if ex.ad_id not in vectors)
            if not exs:
                continue
            if state is None:
                mean, precision, count = self.prior_mean, np.full(self.d, self.prior_precision, np.float32), 0
            else:
                mean, precision, count = state
            mean, precision = update_user(
                mean, precision, np.stack([vectors[ex.ad_id] for ex in exs]),
                np.array([ex.clicked for ex in exs], dtype=np.float32), self.prior_mean, self.params,
            )
            new_states[uid] = (mean, precision, count + len(exs))
            applied += len(exs)
        await self.users.put_many(new_states)
        return applied
