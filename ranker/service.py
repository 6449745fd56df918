"""The serving side: what the API's routes call. No HTTP here, no maths either.

``Recommender`` holds the served model version and follows both the learner
(new versions, swapped atomically: a request reads one ``ModelVersion``
reference for its whole life) and the catalog change log (new or edited ads
become recommendable without waiting for a learner cycle).

A request: arm (salted hash of the user id) → the arm's policy. The learned
policy reads the user's posterior from Redis (one GET; the population prior if
unknown), retrieves candidates from the index with the posterior mean, scores
them with the ranker (both deterministic given the state, so computed once for
all unknown users per model version, catalog state and context), takes the
candidates' counts in the arm from memory (``ranker.adcounts``, followed from
the workers' delta log within about a second) and ranks them with
``ranker.policy``. The impressions go to librdkafka's bounded queue: the answer
never waits for the broker.

Feedback and arms: users are sticky to an arm, so a user vector only ever
learns from its own arm's traffic, and per-ad counts (the calibration factors,
popularity) are kept per arm. The periodic learner trains the projector and
the ranker on the pooled logs of both arms: the treatment also learns from the
control's (more exploratory) traffic. That is the bias this design accepts; the
measured lift is that of "the learned policy trained on pooled traffic", and a
popularity or pinned control never learns from the treatment's traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privads.infra import keys, records, signing
from privads.infra.errors import Forbidden
from privads.infra.kafka import ConfirmingProducer, QueuedProducer
from privads.infra.loops import Step, reason_of
from privads.infra.objects import models_of
from privads.infra.settings import Settings
from privads.infra.store import (
    AdCountLog,
    ArmBucket,
    CatalogStore,
    Counters,
    ModelPointer,
    QualityBoard,
    UserStore,
    WorkerRegistry,
    memory_pressure,
)
from privads.ranker import experiment, scoring
from privads.ranker.adcounts import AdCounts, RowCounts
from privads.ranker.artifacts import (
    EvidenceOffsets,
    ModelVersion,
    load_version,
    prior_or,
    read_manifest,
    recent_manifests,
    version_summary,
)
from privads.ranker.features import context_ids
from privads.ranker.index import CatalogRows, ServingCatalog
from privads.ranker.policy import (
    EMPTY,
    PopularityPolicy,
    Slate,
    ThompsonParams,
    ThompsonPolicy,
    UniformPolicy,
    candidate_logits,
    counts_by_row,
    popularity_order,
)
from privads.ranker.policy import describe as describe_params
from privads.ranker.projector import initial_projector
from privads.ranker.quality import histogram_quantile
from privads.ranker.scoring import pooled_factors, retrieval_keys, retrieval_query
from privads.ranker.updates import dp_epsilon

log = logging.getLogger(__name__)

POPULAR_KEPT = 256  # the popularity control keeps this many ranked ads (k ≤ 100, plus room for deactivations)
REKEY_CHUNK = 256  # ads re-keyed per event-loop turn (one removal and one insertion each in the index)


def prior_of(factors: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The category factor of each of ``groups`` (shape (C,)); 1 for a category newer than ``factors``."""
    if groups.size and groups.max() >= factors.size:
        factors = np.concatenate([factors, np.ones(int(groups.max()) + 1 - factors.size)])
    return factors[groups]


def catalog_evidence(cat: ServingCatalog, clicks: np.ndarray, expected: np.ndarray, category_strength: float,
                     calibration_strength: float) -> tuple[np.ndarray, np.ndarray]:
    """An arm's evidence over a catalog: each category's pooled factor, and each ad's factor for its retrieval key.

    Parameters
    ----------
    clicks, expected : ndarray, shape (≤ N,)
        The arm's counts by catalog row (rows beyond them have none yet).

    Returns
    -------
    factors : ndarray, shape (categories,)
        ``scoring.category_factors``: the prior mean of each category's ads' factors.
    means : ndarray, shape (N,)
        Each ad's factor, its posterior mean (``AdEvidence.mean``); 1 for rows without counts yet.
    """
    n = len(cat.ad_ids)
    m = min(n, clicks.shape[0])
    factors, known = pooled_factors(clicks[:m], expected[:m], cat.group_ids[:m], len(cat.groups), category_strength,
                                    calibration_strength)
    means = np.ones(n)
    means[:m] = known
    return factors, means


def arm_evidence(cat: ServingCatalog, rc: RowCounts, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """``catalog_evidence`` of one arm's counts as the API holds them."""
    return catalog_evidence(cat, rc.clicks[:rc.rows], rc.expected[:rc.rows], settings.category_strength,
                            settings.calibration_strength)


def retrieve(cat: ServingCatalog, mean: np.ndarray, n: int) -> np.ndarray:
    """The learned policy's candidates: every active ad of a catalog of at most ``n``, else the index's best ``n``."""
    return cat.active_rows() if len(cat) <= n else cat.retrieve(mean, n)


def learned_slate(cat: ServingCatalog, rc: RowCounts, factors: np.ndarray | None, got: CatalogRows,
                  user_id: str, state: tuple[np.ndarray, np.ndarray, int], context: np.ndarray,
                  logits: np.ndarray | None, tastes: np.ndarray | None = None,
                  taste_strength: float = 0.0) -> Slate:
    """What the learned policy sees of a request: retrieved rows of ``cat`` with the arm's evidence.

    ``got`` holds the rows as ``cat.take`` gathered them (``/recommend`` gathers once per request).

    ``tastes`` (the user's, ``keys.unpack_tastes``) with ``taste_strength`` > 0 give
    each candidate the user's own factor on its category (``scoring.user_factors``).
    ``/recommend`` and ``privads replay`` build it alike, so that replay re-ranks
    through the same slates.
    """
    mean, precision, count = state
    clicks, shown, expected = rc.take(got.rows)
    user = None
    if tastes is not None and taste_strength > 0:
        user = scoring.user_factors(*keys.taste_counts(tastes, cat.group_hashes()[got.group_ids]), taste_strength)
    return Slate(got.rows, user_id, mean, precision, count, got.vectors, got.bids, got.category_ids,
                 context, clicks, shown, expected, logits,
                 None if factors is None else prior_of(factors, got.group_ids), user)


def rekey_now(cat: ServingCatalog, rc: RowCounts, settings: Settings) -> np.ndarray:
    """Category factors of ``rc``'s arm, with every drifted key of ``cat`` moved to its ad's factor at once.

    For a catalog no request reads yet (a version being loaded, replay's); a served
    one is re-keyed in chunks (``Recommender.follow_counts``).
    """
    factors, means = arm_evidence(cat, rc, settings)
    rows = cat.drifted(means, settings.rekey_tolerance)
    cat.rekey(rows, means[rows])
    return factors


@dataclass(frozen=True, slots=True)
class Candidates:
    """A request's retrieved candidates (catalog rows) and the ranker's logits of them."""

    rows: np.ndarray
    logits: np.ndarray | None


@dataclass(frozen=True, slots=True)
class ShownAd:
    ad_id: str
    position: int
    score: float
    propensity: float
    impression_id: str
    pctr: float | None = None
    factor: float | None = None
    user_factor: float | None = None


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
    value: float = 0.0  # the clicks' values, summed
    value_per_impression: float = 0.0
    value_ci95: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class StreamCounts:
    processed: dict[str, int]  # topic → events the workers processed
    dead_letters: int
    freshness_ms: dict[int, int]  # bound (ms) → clicks applied within it, over its lower neighbour


@dataclass
class LiftReport:
    window_s: float
    arms: dict[str, ArmStats] = field(default_factory=dict)
    lift: float | None = None
    lift_ci95: tuple[float, float] | None = None
    p_value: float | None = None
    lift_ci95_sequential: tuple[float, float] | None = None
    p_value_sequential: float | None = None
    # the same for value per impression (clicks' ``value``: ranker.experiment.value_lift)
    value_lift: float | None = None
    value_lift_ci95: tuple[float, float] | None = None
    value_p_value: float | None = None
    value_lift_ci95_sequential: tuple[float, float] | None = None
    value_p_value_sequential: float | None = None


SWAPS_KEPT = 100  # the model versions this process remembers swapping to (the dashboard's timeline)


class Recommender:
    """Recommendations, click and catalog intake, erasure and lift for the API."""

    def __init__(self, settings: Settings, redis: Any, producer: QueuedProducer, secret: bytes,
                 confirmer: ConfirmingProducer | None = None) -> None:
        self.settings = settings
        self.secret = secret  # signs the impression ids it hands out, checks the clicks on them (infra.signing)
        self.users = UserStore(redis, settings.partitions)
        self.catalog = CatalogStore(redis)
        self.pointer = ModelPointer(redis)
        self.counters = Counters(redis)
        self.quality_board = QualityBoard(redis)
        self.swaps: OrderedDict[str, float] = OrderedDict()  # version → when this process started serving it
        self.models = models_of(settings)  # where the versions are (on S3: with this host's cache)
        self.workers = WorkerRegistry(redis)
        self.ad_log = AdCountLog(redis)
        self.ad_counts = AdCounts()  # the arms' per-ad counts, followed from the workers' log
        self._row_counts: dict[tuple[int, str], RowCounts] = {}  # the same, by row of each served catalog
        # each category's pooled calibration factor in the arm that retrieves from a catalog: the prior of its
        # ads' factors, and (with theirs) the factors in the catalog's retrieval keys (``keyed``)
        self._factors: dict[tuple[int, str], np.ndarray] = {}
        self._evidence_state: dict[tuple[int, str], tuple[int, int]] = {}  # (counts version, catalog mutations)
        # retrieval and the ranker's h(x) are deterministic given (model, catalog state, user mean and count,
        # context): kept for repeat requests of a user whose state has not moved, and shared by all unknown users
        self._candidates_lru: OrderedDict[tuple, Candidates] = OrderedDict()
        self.producer = producer  # impressions: queued, never blocking a request for long
        self.kafka_confirming = True  # whether requests wait for Kafka to confirm their impressions
        self.unconfirmed = 0  # impressions answered before Kafka confirmed them
        self.confirmer = confirmer  # clicks and ads: answered once Kafka has them
        self.rng = np.random.default_rng(settings.seed)
        self.params = ThompsonParams.from_settings(settings)
        # the controls' policies; the learned one is built per request over the version it serves
        self.popularity = PopularityPolicy(settings.base_rate, settings.popularity_prior_strength)
        self.uniform = UniformPolicy(self.rng)
        # the zero vector until a version carries the population prior (ModelVersion.prior); the workers start
        # every new user vector from the served version's too
        self.prior_mean = np.zeros(settings.d_user, dtype=np.float32)
        self.prior_precision = np.full(settings.d_user, settings.prior_precision, dtype=np.float32)
        # until the learner publishes, serve the same seeded projector it starts from
        proj = initial_projector(settings.d_ad, settings.d_user, settings.seed)
        self.served = ModelVersion({"version": None, "catalog_change": "0-0", "built_at": None,
                                    "index": {"type": "Flat"}}, proj, ServingCatalog(settings.d_user))
        self.pinned: ModelVersion | None = None  # the `pinned` control's version
        self.change_id = "0-0"
        # the popularity control's candidates: (catalog they were ranked on, rows best first)
        self.popular: tuple[ServingCatalog, np.ndarray] | None = None
        self._popular_key: tuple | None = None
        # set once the follower has made its first pass (model and catalog), whether or not they loaded: the
        # API's start-up waits for it; whether it can serve is ``readiness``
        self.ready = asyncio.Event()
        # the version ``model:current`` names when it cannot be loaded: the last good one stays served, the bad
        # one is retried with backoff (a directory may come back), logged once
        self.skipped: dict[str, Any] | None = None
        self._skip_step: Step | None = None
        self.catalog_followed = False  # the change log has been followed to its end at least once
        self.pointed: str | None = None  # the version model:current named at the last poll

    # --- following the learner and the catalog ----------------------------------

    def _versions(self) -> list[ModelVersion]:
        return [self.served] + ([self.pinned] if self.pinned is not None else [])

    async def _apply_changes(self, versions: list[ModelVersion], ad_ids: list[str]) -> None:
        entries, emb = await self.catalog.read(ad_ids)
        for version in versions:
            version.catalog.upsert_entries(entries, version.projector.project(emb))

    async def _catch_up(self, versions: list[ModelVersion], change_id: str, block_ms: int | None) -> str:
        while True:
            newest, ad_ids = await self.catalog.changes_since(change_id, block_ms=block_ms)
            if not ad_ids:
                return newest
            await self._apply_changes(versions, ad_ids)
            change_id, block_ms = newest, None

    async def load_pinned(self) -> None:
        """Load the ``pinned`` control's version (its catalog follows the change log like the served one's)."""
        if self.settings.control_policy != "pinned" or self.pinned is not None:
            return
        manifest = await asyncio.to_thread(read_manifest, self.models, str(self.settings.control_version))
        pinned = await asyncio.to_thread(load_version, manifest, self.models)
        await self._catch_up([pinned], manifest.get("catalog_change", "0-0"), None)
        rc = self.row_counts(pinned.catalog, experiment.CONTROL, pinned.evidence)
        self._factors[(id(pinned.catalog), experiment.CONTROL)] = await asyncio.to_thread(
            rekey_now, pinned.catalog, rc, self.settings)
        self.pinned = pinned
        log.info("control arm pinned to model %s", pinned.version)

    async def _maybe_swap(self) -> None:
        """Swap in the version ``model:current`` names, unless it is served, or unreadable and not due a retry.

        A version whose artifacts cannot be read is skipped (``skipped``, logged once):
        the last good version stays served; the same version is retried with backoff,
        and a newer one is tried as soon as the pointer names it.
        """
        manifest = await self.pointer.get()
        self.pointed = None if manifest is None else manifest["version"]
        if manifest is None or manifest["version"] == self.served.version:
            self.skipped = self._skip_step = None
            return
        version = manifest["version"]
        if self.skipped is not None and self.skipped["version"] != version:
            self.skipped = self._skip_step = None  # another version now: try it at once
        if self._skip_step is not None and not self._skip_step.due():
            return
        try:
            loaded = await asyncio.to_thread(load_version, manifest, self.models)
        except Exception as e:  # noqa: BLE001 - a bad version must not stop serving the good one
            if self._skip_step is None:
                self._skip_step = Step(f"loading model {version}", log, base_s=2.0, max_s=60.0)
            self._skip_step.failed(e)
            self.skipped = {"version": version, "reason": reason_of(e), "since": self.skipped["since"]
                            if self.skipped else time.time(), "serving": self.served.version}
            return
        change = await self._catch_up([loaded], manifest.get("catalog_change", "0-0"), None)
        if self.pinned is not None and change != self.change_id:  # bring the pinned catalog to the same point
            await self._catch_up([self.pinned], self.change_id, None)
        # aligned before the first request needs it, with the new version's view of the ads' evidence
        rc = self.row_counts(loaded.catalog, experiment.TREATMENT, loaded.evidence)
        # keys follow the arm's evidence before the first request retrieves (no request reads this catalog yet)
        self._factors[(id(loaded.catalog), experiment.TREATMENT)] = await asyncio.to_thread(
            rekey_now, loaded.catalog, rc, self.settings)
        self.served, self.change_id = loaded, change  # one assignment: requests see old or new, never a mix
        self.swaps[loaded.version] = time.time()
        while len(self.swaps) > SWAPS_KEPT:
            self.swaps.popitem(last=False)
        self._prune_row_counts()
        self._candidates_lru.clear()
        if self._skip_step is not None:
            self._skip_step.succeeded()
        self.skipped = self._skip_step = None
        log.info("serving model %s (%d ads)", loaded.version, len(loaded.catalog))

    async def _refresh_popular(self) -> None:
        """Re-rank the popularity control from the control arm's own counts (off the event loop)."""
        if self.settings.control_policy != "popularity" or self.settings.control_share == 0:
            return
        cat = self.served.catalog
        key = (id(cat), self.change_id, len(cat.ad_ids), self.ad_counts.version)
        if key == self._popular_key:
            return
        counts = self.ad_counts.of_arm(experiment.CONTROL)
        n = len(cat.ad_ids)
        clicks, impressions = counts_by_row(counts, cat.row, n)
        rows, _ = await asyncio.to_thread(
            popularity_order, clicks, impressions, cat.bids[:n], cat.active[:n].copy(), self.settings.base_rate,
            self.settings.popularity_prior_strength, POPULAR_KEPT)
        self.popular, self._popular_key = (cat, rows), key

    async def _follow_model(self) -> None:
        await self._maybe_swap()
        await self.load_pinned()

    async def _follow_catalog(self) -> None:
        self.change_id = await self._catch_up(self._versions(), self.change_id, block_ms=100)
        self.catalog_followed = True

    async def follow(self, poll_s: float = 1.0) -> None:
        """Run forever: apply catalog changes as they are logged, swap in new model versions.

        Three steps, each on its own (``infra.loops.Step``): a failure of one (Redis
        away, a version that cannot be read) is logged once and retried with backoff
        while the others go on, so a bad model version never stops the catalog.
        """
        model = Step("following model:current", log, max_s=10.0)
        catalog = Step("following the catalog change log", log, max_s=10.0)
        popular = Step("ranking the popularity control", log, max_s=10.0)
        last_poll = last_popular = 0.0
        while True:
            if time.monotonic() - last_poll >= poll_s:
                last_poll = time.monotonic()
                await model.run(self._follow_model)
            if not await catalog.run(self._follow_catalog):
                await asyncio.sleep(0.1)  # failing or backing off: the read's own block is not there to pace the loop
            self.ready.set()  # a first pass of both, whatever came of it
            if time.monotonic() - last_popular >= self.settings.popularity_refresh_s:
                last_popular = time.monotonic()
                await popular.run(self._refresh_popular)

    async def memory_pressure(self) -> str | None:
        """Why Redis' memory is a problem now (near its ceiling, or a policy that evicts), or None.

        Reported by ``/readyz`` without making the API unready: serving reads still work, but the
        workers' commits and erasures are refused while Redis is full (README: Resource limits).
        """
        return await memory_pressure(self.users.r)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether requests get what the model and the catalog make of them, and why not.

        Ready once a model version the learner published is served and the catalog
        change log has been followed to its end. A version ``model:current`` names but
        that cannot be read does not make a serving API unready: it is reported
        (``skipped``) beside the version still served.

        Returns
        -------
        ready : bool
        body : dict
            ``model_version``, ``ads``, ``catalog_change``, ``skipped`` (the unreadable
            version, its reason, since when, or None) and, when not ready, ``reason``.
        """
        missing = []
        if self.served.version is None:
            if self.skipped is not None:
                missing.append(f"no model version loaded: model:current names {self.skipped['version']}, which "
                               f"cannot be read ({self.skipped['reason']}); waiting for a version that can")
            elif self.pointed is None:
                missing.append("no model version loaded: the learner has not published one yet (model:current is "
                               "unset)")
            else:
                missing.append(f"no model version loaded yet: loading {self.pointed}")
        if not self.catalog_followed:
            missing.append("the catalog is not loaded yet: its change log has not been followed to the end")
        body: dict[str, Any] = {"model_version": self.served.version, "ads": len(self.served.catalog),
                                "catalog_change": self.change_id, "skipped": self.skipped}
        if missing:
            body["reason"] = "; ".join(missing)
        return not missing, body

    async def follow_counts(self, block_ms: int = 1000) -> None:
        """Run forever: keep ``ad_counts`` current from the workers' log (a fresh snapshot after any gap)."""
        last: bytes | None = None
        read_at = 0.0
        while True:
            try:
                if last is None or time.monotonic() - read_at > keys.ADSTAT_LOG_HORIZON_S / 2:
                    snapshot, last = await self.ad_log.snapshot(experiment.ARMS)
                    self.ad_counts.reset(snapshot)
                else:
                    deltas, last = await self.ad_log.since(last, block_ms)
                    for delta in deltas:
                        self.ad_counts.apply(delta)
                read_at = time.monotonic()
                for rc in list(self._row_counts.values()):  # patched here, not on a request's path
                    rc.sync(self.ad_counts)
                for cat, arm in self.keyed():
                    await self._follow_evidence(cat, arm)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving the counts we have; re-read them all when back
                log.exception("following the per-ad counts failed; retrying")
                last = None
                await asyncio.sleep(1.0)

    def keyed(self) -> list[tuple[ServingCatalog, str]]:
        """The (catalog, arm) pairs whose retrieval follows the arm's evidence: the learned policies'."""
        out = [(self.served.catalog, experiment.TREATMENT)]
        if self.pinned is not None:
            out.append((self.pinned.catalog, experiment.CONTROL))
        return out

    async def _follow_evidence(self, cat: ServingCatalog, arm: str) -> None:
        """Recompute the arm's category factors and move drifted retrieval keys, a chunk per loop turn.

        The factors are computed off the loop; the index is changed on it (requests
        search it there), ``REKEY_CHUNK`` ads at a time.
        """
        s, rc = self.settings, self.row_counts(cat, arm)  # the arm's counts, synced
        state = (rc.version, cat.mutations)
        if self._evidence_state.get((id(cat), arm)) == state:
            return  # nothing moved since the last pass
        self._evidence_state[(id(cat), arm)] = state

        def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # O(catalog): off the loop
            factors, means = arm_evidence(cat, rc, s)
            return factors, means, cat.drifted(means, s.rekey_tolerance)

        factors, means, rows = await asyncio.to_thread(compute)
        self._factors[(id(cat), arm)] = factors
        for start in range(0, rows.size, REKEY_CHUNK):
            chunk = rows[start:start + REKEY_CHUNK]
            cat.rekey(chunk, means[chunk])
            await asyncio.sleep(0)

    def row_counts(self, catalog: ServingCatalog, arm: str, evidence: EvidenceOffsets | None = None) -> RowCounts:
        """One arm's per-ad counts aligned with ``catalog``'s rows, current to the followed log.

        ``evidence``: the offsets of the version that owns ``catalog``, given when its counts are first
        aligned (at load); they apply to the arm that version's learned policy serves, never to the
        popularity or random control's counts.
        """
        key = (id(catalog), arm)
        rc = self._row_counts.get(key)
        if rc is None or rc.catalog is not catalog:
            offset = (evidence or {}).get(arm) if self._learned_arm(arm) else None
            rc = self._row_counts[key] = RowCounts(catalog, arm, offset)
        if rc.version != self.ad_counts.version or rc.rows != len(catalog.ad_ids):
            rc.sync(self.ad_counts)
        return rc

    def _learned_arm(self, arm: str) -> bool:
        return experiment.learned_arm(arm, self.settings.control_policy)

    def _prune_row_counts(self) -> None:
        live = {id(v.catalog) for v in self._versions()}
        for key in [k for k in self._row_counts if k[0] not in live]:
            del self._row_counts[key]
        for key in [k for k in self._factors if k[0] not in live]:
            del self._factors[key]
            self._evidence_state.pop(key, None)

    # --- requests -----------------------------------------------------------------

    async def _rank(self, user_id: str, k: int, context: dict[str, Any] | None) -> tuple[
            str, ModelVersion, tuple[np.ndarray, np.ndarray, int], ServingCatalog, np.ndarray, scoring.Ranked]:
        """The user's arm, the version that serves it, the user as the ranker sees it, and the ranked list."""
        s = self.settings
        arm = experiment.assign_arm(user_id, s.arm_salt, s.control_share)
        version = self.served
        if arm == experiment.CONTROL and s.control_policy == "pinned":
            version = self.pinned or version  # not loaded yet: the served model stands in, and says so below
        # what a ranker sees of the user, read for every arm: each impression logs it as the learner's features
        state, tastes = await self.users.get_with_tastes(user_id)
        seen = state if state else (prior_or(version.prior, self.prior_mean), self.prior_precision, 0)
        if self._learned_arm(arm):
            cat, rows, ranked = await self._learned(version, arm, user_id, k, context, seen, tastes)
        elif s.control_policy == "popularity":
            cat, rows, ranked = self._popularity(version, k)
        else:
            cat, rows, ranked = self._random(version, k)
        return arm, version, seen, cat, rows, ranked

    async def recommend(self, user_id: str, k: int, context: dict[str, Any] | None) -> Recommendation:
        """Top-k ads for a user from the policy of the user's arm."""
        arm, version, seen, cat, rows, ranked = await self._rank(user_id, k, context)
        request_id, *random_ids = records.new_event_ids(1 + ranked.index.size)
        ad_ids = cat.ids_of(rows[ranked.index])
        # each impression id binds its user and ad: a click can name only an impression served to both
        impression_ids = signing.sign_many(self.secret, user_id, random_ids, ad_ids)
        none = [None] * ranked.index.size
        pctr = ranked.pctr.tolist() if ranked.pctr is not None else none
        factor = ranked.factor.tolist() if ranked.factor is not None else none
        mine = ranked.user_factor.tolist() if ranked.user_factor is not None else none
        shown = [ShownAd(ad_id, pos, score, prop, impression_ids[pos], p, f, u)
                 for pos, (ad_id, score, prop, p, f, u) in
                 enumerate(zip(ad_ids, ranked.score.tolist(), ranked.propensity.tolist(), pctr, factor, mine,
                               strict=True))]
        confirmed = self._log_impressions(user_id, arm, version.version, request_id, context, shown, seen)
        await self._await_confirmation(confirmed, len(shown))
        return Recommendation(request_id, arm, version.version, shown)

    async def explain(self, user_id: str, k: int, context: dict[str, Any] | None) -> dict[str, Any]:
        """What ``recommend`` would serve the user now, each ad's score broken into its parts; logs nothing.

        A learned arm's score is ``min(σ(dot_scale · user_dot + logit) · factor, 1) · bid`` under the
        served draw (``scoring.ScoreParts``); ``retrieval_score`` is the ad's index key against the
        user's mean (``scoring.retrieval_keys``), which chose the candidates. The list is a fresh
        draw of the same policy: another request may show other ads, with the propensities given.
        """
        arm, version, seen, cat, rows, ranked = await self._rank(user_id, k, context)
        mean, _, count = seen
        shown = rows[ranked.index]
        learned = self._learned_arm(arm)
        policy = "thompson" if learned else self.settings.control_policy
        out: dict[str, Any] = {"user_id": user_id, "arm": arm, "policy": policy, "model_version": version.version,
                               "user_count": int(count), "logged": False, "ads": []}
        if learned:
            out["formula"] = "score = min(σ(dot_scale · user_dot + logit) · factor, 1) · bid"
        parts = ranked.parts if learned else None
        retrieval = None if parts is None else retrieval_keys(
            cat.vectors[shown], cat.bids[shown], cat.factors[shown]) @ retrieval_query(mean)
        for pos, (ad_id, score, prop) in enumerate(zip(cat.ids_of(shown), ranked.score.tolist(),
                                                       ranked.propensity.tolist(), strict=True)):
            ad: dict[str, Any] = {"ad_id": ad_id, "position": pos, "score": float(score), "propensity": float(prop),
                                  "bid": float(cat.bids[shown[pos]])}
            if parts is not None and retrieval is not None:
                ad.update(retrieval_score=float(retrieval[pos]), logit=float(parts.logit[pos]),
                          dot_scale=float(parts.dot_scale), user_dot=float(parts.user_dot[pos]),
                          user_dot_mean=float(cat.vectors[shown[pos]] @ mean), factor=float(parts.factor[pos]),
                          factor_mean=None if ranked.factor is None else float(ranked.factor[pos]),
                          pctr_mean=None if ranked.pctr is None else float(ranked.pctr[pos]))
            out["ads"].append(ad)
        return out

    async def _await_confirmation(self, confirmed: asyncio.Future[bool] | None, n: int) -> None:
        """Answer once Kafka has the request's impressions, waiting at most ``IMPRESSION_CONFIRM_S``.

        An API killed right after answering then loses none of what it answered. While Kafka is
        away the wait would only add latency: after one wait runs out, requests stop waiting
        until a later batch is confirmed again (``kafka_confirming``); their impressions stay
        queued and are counted as ``unconfirmed``.
        """
        if confirmed is None:
            return
        if self.kafka_confirming:
            try:
                if await asyncio.wait_for(asyncio.shield(confirmed), self.settings.impression_confirm_s):
                    return
            except TimeoutError:
                self.kafka_confirming = False
                log.warning("Kafka did not confirm a request's impressions within %g s; answering without waiting "
                            "until it does again (they stay queued)", self.settings.impression_confirm_s)
        self.unconfirmed += n

    def _confirmation(self, done: asyncio.Future[bool]) -> None:
        if done.result() and not self.kafka_confirming:
            self.kafka_confirming = True
            log.info("Kafka confirms impressions again: requests wait for it")

    async def _learned(self, version: ModelVersion, arm: str, user_id: str, k: int, context: dict[str, Any] | None,
                       user: tuple[np.ndarray, np.ndarray, int], tastes: np.ndarray | None = None
                       ) -> tuple[ServingCatalog, np.ndarray, scoring.Ranked]:
        """Thompson sampling over a model version: retrieve with the posterior mean, rank with draws."""
        cat = version.catalog
        mean, precision, count = user
        ctx = context_ids(context)
        key = (id(version), cat.mutations, mean.tobytes(), count, ctx.tobytes())
        cands = self._candidates_lru.get(key)
        rows = cands.rows if cands is not None else self._retrieve(cat, mean)
        if rows.size == 0:
            return cat, rows, EMPTY
        got = cat.take(rows)  # once: each gather from the catalog's arrays misses the cache per candidate
        if cands is None:
            logits = None if version.ranker is None else candidate_logits(
                version.ranker, mean, count, got.vectors, got.bids, got.category_ids, ctx)
            cands = self._remember(key, Candidates(rows, logits))
        else:
            self._candidates_lru.move_to_end(key)
        slate = learned_slate(cat, self.row_counts(cat, arm), self._factors.get((id(cat), arm)), got, user_id,
                              (mean, precision, count), ctx, cands.logits, tastes, self.settings.tastes)
        return cat, rows, ThompsonPolicy(self.params, version.ranker, self.rng).rank(slate, k)

    def _retrieve(self, cat: ServingCatalog, mean: np.ndarray) -> np.ndarray:
        return retrieve(cat, mean, self.settings.candidates)

    def _remember(self, key: tuple, cands: Candidates) -> Candidates:
        if self.settings.candidate_cache:
            self._candidates_lru[key] = cands
            while len(self._candidates_lru) > self.settings.candidate_cache:
                self._candidates_lru.popitem(last=False)
        return cands

    def _popularity(self, version: ModelVersion, k: int) -> tuple[ServingCatalog, np.ndarray, scoring.Ranked]:
        """The popularity control: the arm's best ads by posterior-mean CTR × bid (deterministic).

        Its candidates are the arm's best ``POPULAR_KEPT`` of the whole catalog, re-ranked every
        ``popularity_refresh_s`` off the event loop; each request ranks them by the current counts.
        """
        popular = self.popular
        active = len(version.catalog)
        if popular is None or popular[1].size < min(k, active):
            # not ranked yet, or ranked before the catalog filled: the best by the arm's prior (bid alone)
            cat = version.catalog
            n = len(cat.ad_ids)
            zeros = np.zeros(n, np.int64)
            rows, _ = popularity_order(zeros, zeros, cat.bids[:n], cat.active[:n], self.settings.base_rate,
                                       self.settings.popularity_prior_strength, k)
        else:
            cat, rows = popular
            rows = rows[cat.active[rows]]  # deactivated since the last re-rank: skip
        clicks, shown, _ = self.row_counts(cat, experiment.CONTROL).take(rows)
        return cat, rows, self.popularity.rank(Slate(rows, clicks=clicks, shown=shown, bids=cat.bids[rows]), k)

    def _random(self, version: ModelVersion, k: int) -> tuple[ServingCatalog, np.ndarray, scoring.Ranked]:
        """The random control: k distinct active ads, uniformly."""
        cat = version.catalog
        rows = cat.active_rows()
        return cat, rows, self.uniform.rank(Slate(rows), k)

    def _log_impressions(self, user_id: str, policy: str, model_version: str | None, request_id: str,
                         context: dict[str, Any] | None, shown: list[ShownAd],
                         seen: tuple[np.ndarray, np.ndarray, int]) -> asyncio.Future[bool] | None:
        """Queue one impression per shown ad, with the user as served; never blocks (the producer counts drops).

        Returns a future that turns True once Kafka has them (None when ``IMPRESSION_CONFIRM_S`` is 0).
        """
        now = time.time()
        user_mean, user_count = records.pack_served(seen[0]), int(seen[2])
        confirmed: asyncio.Future[bool] | None = None
        if self.settings.impression_confirm_s > 0:
            confirmed = asyncio.get_running_loop().create_future()
            confirmed.add_done_callback(self._confirmation)
        self.producer.send_batch(records.IMPRESSIONS, [
            (user_id, records.encode(records.Impression(
                event_id=a.impression_id, ts=now, user_id=user_id, ad_id=a.ad_id, position=a.position,
                propensity=a.propensity, policy=policy, model_version=model_version,
                request_id=request_id, context=context or None, pctr=a.pctr, factor=a.factor,
                user_factor=a.user_factor, user_mean=user_mean, user_count=user_count)))
            for a in shown], confirm=confirmed)
        return confirmed

    async def report_click(self, impression_id: str, user_id: str, ad_id: str, value: float | None) -> str:
        """Produce a click to ``clicks`` and return its event id once Kafka has it.

        Raises
        ------
        Forbidden
            If ``impression_id`` is not one this API signed for ``user_id`` and ``ad_id``
            (made up, another user's, or another ad's): nothing is produced.
        Unavailable
            If Kafka did not confirm it in time (``ConfirmingProducer.send``).
        """
        if not signing.verify(self.secret, impression_id, user_id, ad_id):
            raise Forbidden("impression_id: not an impression served to this user_id and ad_id")
        event_id = records.new_event_id()
        click = records.Click(event_id=event_id, ts=time.time(), impression_id=impression_id,
                              user_id=user_id, ad_id=ad_id, value=value)
        await self._confirmed(records.CLICKS, user_id, records.encode(click))
        return event_id

    async def upsert_ad(self, ad: records.Ad) -> None:
        """Produce a catalog upsert to ``ads`` (the same path as any producer's), once Kafka has it."""
        await self._confirmed(records.ADS, ad.ad_id, records.encode(ad))

    async def _confirmed(self, topic: str, key: str, value: bytes) -> None:
        if self.confirmer is None:  # no confirming producer given (a test's recommender): queued only
            self.producer.send(topic, key, value)
            return
        # within the request's own time limit (PRIVADS_REQUEST_TIMEOUT_S), with room to answer
        await self.confirmer.send(topic, key, value, timeout_s=0.75 * self.settings.request_timeout_s)

    async def erase_user(self, user_id: str) -> None:
        await self.users.erase(user_id, time.time())

    async def lift(self, window_s: float) -> LiftReport:
        counts = await self.counters.arm_counts(window_s)
        report = LiftReport(window_s=window_s)
        for arm, c in counts.items():
            n, clicks = c.impressions, c.clicks
            value = experiment.arm_value(c.value, c.value_sq, n)
            report.arms[arm] = ArmStats(n, clicks, clicks / n if n else 0.0, experiment.wilson(clicks, n), c.value,
                                        value.per_impression, value.ci95)
        t, c = counts.get(experiment.TREATMENT, ArmBucket()), counts.get(experiment.CONTROL, ArmBucket())
        res = experiment.lift(t.clicks, t.impressions, c.clicks, c.impressions)
        report.lift, report.lift_ci95, report.p_value = res.lift, res.ci95, res.p_value
        seq = experiment.sequential_lift(t.clicks, t.impressions, c.clicks, c.impressions)
        report.lift_ci95_sequential, report.p_value_sequential = seq.ci95, seq.p_value
        vt, vc = (t.value, t.value_sq, t.impressions), (c.value, c.value_sq, c.impressions)
        val = experiment.value_lift(*vt, *vc)
        report.value_lift, report.value_lift_ci95, report.value_p_value = val.lift, val.ci95, val.p_value
        vseq = experiment.sequential_value_lift(*vt, *vc)
        report.value_lift_ci95_sequential, report.value_p_value_sequential = vseq.ci95, vseq.p_value
        return report

    async def lift_series(self, window_s: float) -> dict[str, Any]:
        """CTR of each arm per time bucket and the cumulative lift since the window's start, with both intervals."""
        span, starts, arms = await self.counters.arm_series(window_s)
        out: dict[str, Any] = {"window": window_s, "bucket_s": float(span), "starts": starts, "arms": {}, "lift": [],
                               "lift_ci95": [], "lift_ci95_sequential": []}
        out.update(value_lift=[], value_lift_ci95=[], value_lift_ci95_sequential=[])
        for arm, s in arms.items():
            ctr = [c / n if n else None for c, n in zip(s["clicks"], s["impressions"], strict=True)]
            vpi = [v / n if n else None for v, n in zip(s["value"], s["impressions"], strict=True)]
            out["arms"][arm] = {"impressions": s["impressions"], "clicks": s["clicks"], "ctr": ctr,
                                "value": s["value"], "value_per_impression": vpi}
        empty: dict[str, list] = {f: [0] * len(starts) for f in ("impressions", "clicks", "value", "value_sq")}
        t, c = arms.get(experiment.TREATMENT, empty), arms.get(experiment.CONTROL, empty)
        # cumulative from the window's start: what the sequential interval assumes
        cum = [np.cumsum(x).tolist() for x in (t["clicks"], t["impressions"], c["clicks"], c["impressions"])]
        vcum = [np.cumsum(x).tolist() for x in (t["value"], t["value_sq"], c["value"], c["value_sq"])]
        for ct, nt, cc, nc, vt, qt, vc, qc in zip(*cum, *vcum, strict=True):
            fixed = experiment.lift(ct, nt, cc, nc)
            out["lift"].append(fixed.lift)
            out["lift_ci95"].append(fixed.ci95)
            out["lift_ci95_sequential"].append(experiment.sequential_lift(ct, nt, cc, nc).ci95)
            val = experiment.value_lift(vt, qt, nt, vc, qc, nc)
            out["value_lift"].append(val.lift)
            out["value_lift_ci95"].append(val.ci95)
            out["value_lift_ci95_sequential"].append(experiment.sequential_value_lift(vt, qt, nt, vc, qc, nc).ci95)
        return out

    async def stream_counts(self) -> StreamCounts:
        """What the stream workers counted: events per topic, dead letters, and the freshness histogram."""
        stats = await self.counters.stats()
        return StreamCounts({k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("processed:")},
                            stats.get("dead_letters", 0), await self.counters.freshness())

    async def consumer_lag(self) -> dict[str, int]:
        """Records the live stream workers have not taken yet, per topic (from their heartbeats)."""
        lag: dict[str, int] = {}
        for beat in (await self.workers.alive(time.time())).values():
            for topic, n in beat.get("lag", {}).items():
                lag[topic] = lag.get(topic, 0) + int(n)
        return lag

    async def model_history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` model versions, oldest first: when built, why, what changed, the gates' verdicts
        and figures, and when this API process swapped to it (None: never served here)."""
        manifests = await asyncio.to_thread(recent_manifests, self.models, limit)
        return [version_summary(m, self.swaps.get(m["version"])) for m in manifests]

    async def stream_health(self) -> dict[str, Any]:
        """The stream workers' counts (events per topic, dead letters), their lag, and click freshness quantiles."""
        counts = await self.stream_counts()
        hist = counts.freshness_ms
        return {"processed": counts.processed, "dead_letters": counts.dead_letters,
                "recent_dead_letters": await self.counters.recent_dead_letters(),
                "lag": await self.consumer_lag(), "freshness_clicks": sum(hist.values()),
                "freshness_p50_ms": histogram_quantile(hist, 0.5), "freshness_p99_ms": histogram_quantile(hist, 0.99)}

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
                      "nlist": v.catalog.info.nlist, "nprobe": v.catalog.info.nprobe,
                      "tuned_on": v.catalog.info.tuned_on},
            "catalog_change": self.change_id,
            "arms": {"control_share": self.settings.control_share, "control_policy": self.settings.control_policy,
                     "control_version": self.pinned.version if self.pinned is not None else None},
            "exploration": describe_params(self.params),
        }
