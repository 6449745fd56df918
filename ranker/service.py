"""The serving side: what the API's routes call. No HTTP here, no maths either.

``Recommender`` holds the served model version and follows both the learner
(new versions, swapped atomically: a request reads one ``ModelVersion``
reference for its whole life) and the catalog change log (new or edited ads
become recommendable without waiting for a learner cycle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra.kafka import QueuedProducer
from infra.settings import Settings
from infra.store import CatalogStore, Counters, ModelPointer, QualityBoard, UserStore
from learner.artifacts import ModelVersion, load_version
from learner.projector import initial_projector
from ranker import experiment, scoring
from ranker.features import candidate_rows, context_ids
from ranker.index import ServingCatalog
from streams import records
from streams.updates import dp_epsilon, logit

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShownAd:
    ad_id: str
    position: int
    score: float
    propensity: float
    impression_id: str


@dataclass(frozen=True, slots=True)
class Recommendation:
    request_id: str
    policy: str
    model_version: str | None
    ads: list[ShownAd]


@dataclass
class ArmStats:
    impressions: int
    clicks: int
    ctr: float
    ci95: tuple[float, float]


@dataclass
class LiftReport:
    window_s: float
    arms: dict[str, ArmStats] = field(default_factory=dict)
    lift: float | None = None
    lift_ci95: tuple[float, float] | None = None
    p_value: float | None = None


class Recommender:
    """Recommendations, click and catalog intake, erasure and lift for the API."""

    def __init__(self, settings: Settings, redis: Any, producer: QueuedProducer) -> None:
        self.settings = settings
        self.users = UserStore(redis)
        self.catalog = CatalogStore(redis)
        self.pointer = ModelPointer(redis)
        self.counters = Counters(redis)
        self.quality_board = QualityBoard(redis)
        self.producer = producer
        self.rng = np.random.default_rng(settings.seed)
        self.bias = logit(settings.base_rate)
        self.prior_mean = np.zeros(settings.d_user, dtype=np.float32)
        self.prior_precision = np.full(settings.d_user, settings.prior_precision, dtype=np.float32)
        # until the learner publishes, serve the same seeded projector it starts from
        proj = initial_projector(settings.d_ad, settings.d_user, settings.seed)
        self.served = ModelVersion({"version": None, "catalog_change": "0-0", "built_at": None,
                                    "index": {"type": "Flat"}}, proj, ServingCatalog(settings.d_user))
        self.change_id = "0-0"
        self.ready = asyncio.Event()

    # --- following the learner and the catalog ----------------------------------

    async def _apply_changes(self, version: ModelVersion, ad_ids: list[str]) -> None:
        entries, emb = await self.catalog.read(ad_ids)
        version.catalog.upsert_entries(entries, version.projector.project(emb))

    async def _catch_up(self, version: ModelVersion, change_id: str, block_ms: int | None) -> str:
        while True:
            newest, ad_ids = await self.catalog.changes_since(change_id, block_ms=block_ms)
            if not ad_ids:
                return newest
            await self._apply_changes(version, ad_ids)
            change_id, block_ms = newest, None

    async def _maybe_swap(self) -> None:
        manifest = await self.pointer.get()
        if manifest is None or manifest["version"] == self.served.version:
            return
        loaded = await asyncio.to_thread(load_version, manifest)
        change = await self._catch_up(loaded, manifest.get("catalog_change", "0-0"), None)
        self.served, self.change_id = loaded, change  # one assignment: requests see old or new, never a mix
        log.info("serving model %s (%d ads)", loaded.version, len(loaded.catalog))

    async def follow(self, poll_s: float = 1.0) -> None:
        """Run forever: apply catalog changes as they are logged, swap in new model versions."""
        last_poll = 0.0
        while True:
            try:
                if time.monotonic() - last_poll >= poll_s:
                    last_poll = time.monotonic()
                    await self._maybe_swap()
                    self.ready.set()
                self.change_id = await self._catch_up(self.served, self.change_id, block_ms=100)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving the current version
                log.exception("following the catalog/model failed; retrying")
                await asyncio.sleep(1.0)

    # --- requests -----------------------------------------------------------------

    async def recommend(self, user_id: str, k: int, context: dict[str, Any] | None) -> Recommendation:
        """Top-k ads for a user: Thompson sampling for treatment, the control policy otherwise."""
        version = self.served
        cat = version.catalog
        policy = experiment.assign_arm(user_id, self.settings.arm_salt, self.settings.control_share)
        request_id = records.new_event_id()
        rows = cat.active_rows()
        if rows.size == 0:
            return Recommendation(request_id, policy, version.version, [])
        if policy == experiment.CONTROL:
            ranked = scoring.uniform_rank(rows.size, k, self.rng)
            cand = rows
        else:
            (state,) = await self.users.get_many([user_id])
            mean, precision, count = state if state else (self.prior_mean, self.prior_precision, 0)
            cand = rows if rows.size <= self.settings.candidates else cat.retrieve(mean, self.settings.candidates)
            bias, dot_scale = self.bias, 1.0
            if version.ranker is not None:
                features = candidate_rows(mean, count, cat.vectors[cand], cat.bids[cand], cat.category_ids[cand],
                                          context_ids(context))
                bias, dot_scale = version.ranker.candidate_logits(features), version.ranker.dot_weight
            ranked = scoring.thompson_rank(
                mean, precision, cat.vectors[cand], cat.bids[cand], k, bias=bias,
                draws=self.settings.propensity_draws, scale=self.settings.exploration, rng=self.rng,
                dot_scale=dot_scale)
        now = time.time()
        shown = []
        for pos, (i, score, prop) in enumerate(zip(ranked.index, ranked.score, ranked.propensity)):
            ad_id = cat.ad_ids[int(cand[i])]
            shown.append(ShownAd(ad_id, pos, float(score), float(prop), records.new_event_id()))
        self.producer.send_many(
            (records.IMPRESSIONS, user_id, records.encode(records.Impression(
                event_id=s.impression_id, ts=now, user_id=user_id, ad_id=s.ad_id, position=s.position,
                propensity=s.propensity, policy=policy, model_version=version.version,
                request_id=request_id, context=context or None)))
            for s in shown)
        return Recommendation(request_id, policy, version.version, shown)

    def report_click(self, impression_id: str, user_id: str, ad_id: str, value: float | None) -> str:
        """Queue a click for ``privads.clicks``; returns its event id."""
        event_id = records.new_event_id()
        click = records.Click(event_id=event_id, ts=time.time(), impression_id=impression_id,
                              user_id=user_id, ad_id=ad_id, value=value)
        self.producer.send(records.CLICKS, user_id, records.encode(click))
        return event_id

    def upsert_ad(self, ad: records.Ad) -> None:
        """Queue a catalog upsert for ``privads.ads`` (the same path as any producer's)."""
        self.producer.send(records.ADS, ad.ad_id, records.encode(ad))

    async def erase_user(self, user_id: str) -> None:
        await self.users.erase(user_id, time.time(), self.settings.attribution_window_s + 3600)

    async def lift(self, window_s: float) -> LiftReport:
        counts = await self.counters.arm_counts(window_s)
        report = LiftReport(window_s=window_s)
        for arm, c in counts.items():
            n, clicks = c["impressions"], c["clicks"]
            report.arms[arm] = ArmStats(n, clicks, clicks / n if n else 0.0, experiment.wilson(clicks, n))
        t = counts.get(experiment.TREATMENT, {"impressions": 0, "clicks": 0})
        c = counts.get(experiment.CONTROL, {"impressions": 0, "clicks": 0})
        res = experiment.lift(t["clicks"], t["impressions"], c["clicks"], c["impressions"])
        report.lift, report.lift_ci95, report.p_value = res.lift, res.ci95, res.p_value
        return report

    async def worker_counters(self) -> dict[str, int]:
        """Events processed per topic by the stream workers."""
        stats = await self.counters.stats()
        return {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("processed:")}

    async def quality(self) -> dict[str, Any]:
        """Rolling AUC / log-loss of served predictions against outcomes, and drift."""
        return await self.quality_board.read(time.time())

    async def privacy(self) -> dict[str, Any]:
        """How user vectors are protected: DP parameters and the worst user's ε so far."""
        s = self.settings
        if s.dp_clip is None:
            return {"differential_privacy": False, "pseudonymous_ids": True, "pii_in_models": False}
        most = await self.counters.max_user_updates()
        return {"differential_privacy": True, "pseudonymous_ids": True, "pii_in_models": False,
                "clip": s.dp_clip, "noise_multiplier": s.dp_noise, "delta": s.dp_delta,
                "max_updates_per_user": most, "epsilon": dp_epsilon(most, s.dp_noise, s.dp_delta)}

    def model_info(self) -> dict[str, Any]:
        v = self.served
        m = v.manifest
        return {
            "version": m.get("version"),
            "built_at": m.get("built_at"),
            "projector": {"type": "linear", "d_in": int(v.projector.weight.shape[0]), "d_out": v.projector.d_user,
                          "version": m.get("version")},
            "ranker": {**(v.ranker.describe() if v.ranker is not None else {"type": "thompson-logistic"}),
                       "version": m.get("version"), "evaluation": m.get("evaluation", {}).get("ranker")},
            "index": {"type": v.catalog.index_type, "size": len(v.catalog), "ads": len(v.catalog.ad_ids),
                      "built_at": m.get("built_at"), "recall_at_500": v.catalog.info.recall_at_k,
                      "nlist": v.catalog.info.nlist, "nprobe": v.catalog.info.nprobe},
            "catalog_change": self.change_id,
        }
