"""One learner cycle, and the periodic loop around it.

A cycle reads the catalog the stream has encoded and the archived labelled
impressions, split by time: the newest 20% are the holdout. While no user has
been learned, the served projector is replaced by one fitted to the catalog
(``ranker.projector.initial_projector``): the user space follows the catalog
until the first user lives in it. It then

1. trains a candidate projector (users frozen, warm-started from the served one)
   and keeps it only if the gate passes on the holdout;
2. with the projector kept, trains the ranker (a deep & cross network, warm-started)
   and the logistic-regression baseline on the same features, scores both, the
   served ranker and a popularity baseline on the holdout (AUC, log-loss,
   NDCG@10), serves the better of the two trained ones, and only if the gate
   passes against what is served;
3. projects the catalog, builds the index (recall@500 against exact search),
   measures retrieval recall@500 of the holdout clicks, writes a new version and
   announces it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import numpy as np
import orjson
import torch

from privads.infra import progress
from privads.infra.kafka import make_producer
from privads.infra.keys import EXPECTED_SCALE
from privads.infra.loops import Step, reason_of
from privads.infra.objects import Objects, archive_of, models_of
from privads.infra.records import MODEL_UPDATES, unpack_served
from privads.infra.settings import Settings
from privads.infra.store import (
    AdCountLog,
    CatalogEntry,
    CatalogStore,
    Client,
    ModelPointer,
    QualityBoard,
    UserStore,
    connect,
)
from privads.learner import ranking
from privads.learner.erasure import compact_archive, without_erased
from privads.learner.evaluation import Scores, auc, auc_difference, gate, log_loss, ndcg_at_k
from privads.learner.logs import Rows
from privads.learner.offline import evaluate
from privads.learner.replay import request_states, rerank
from privads.learner.train import train_projector
from privads.ranker.adcounts import AdCounts
from privads.ranker.artifacts import (
    CATALOG_FIT,
    RANDOM_FIT,
    TRAINED_FIT,
    EvidenceOffsets,
    ModelVersion,
    collect_garbage,
    fit_of,
    load_evidence,
    load_version,
    refittable,
    version_dir,
    write_manifest,
    write_version,
)
from privads.ranker.experiment import ARMS, TREATMENT
from privads.ranker.features import MAX_CONTEXT_TOKENS, build_rows, category_id, context_ids
from privads.ranker.index import ServingCatalog
from privads.ranker.model import RankerModel
from privads.ranker.projector import Projector, initial_projector
from privads.ranker.scoring import pooled_factors
from privads.ranker.updates import logit, population_prior, sigmoid
from privads.streams import archive

log = logging.getLogger(__name__)
READ_CHUNK = 5000


HOLDOUT = 0.2
MIN_EXAMPLES = 200
MAX_EXAMPLES = 1_000_000
EXAMPLE_COLUMNS = ["event_id", "ts", "user_id", "ad_id", "position", "request_id", "policy", "propensity", "raw",
                   "user_mean", "user_count"]


@dataclass
class Examples:
    """Labelled impressions for training, in time order."""

    ads: np.ndarray  # (n, d_ad) text embeddings
    users: np.ndarray  # (n, d_user) frozen user vectors
    clicked: np.ndarray  # (n,)
    ts: np.ndarray  # (n,)
    counts: np.ndarray  # (n,) labelled impressions the user has been updated with
    bids: np.ndarray  # (n,)
    category: np.ndarray  # (n,) category bucket
    context: np.ndarray  # (n, MAX_CONTEXT_TOKENS) hashed request context
    position: np.ndarray  # (n,)
    value: np.ndarray  # (n,) click value; NaN if none was logged
    group: np.ndarray  # (n,) request index
    ad_ids: np.ndarray  # (n,) object
    event_ids: np.ndarray  # (n,) object: the impressions' ids
    policy: np.ndarray  # (n,) object: the arm that served each impression
    propensity: np.ndarray  # (n,) the logged propensity; NaN where none was logged
    contexts: np.ndarray  # (n,) object: the request's context as sent (a dict, or None)

    def take(self, idx: slice) -> Examples:
        return Examples(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


async def load_examples(settings: Settings, r: Client, embeddings: dict[str, np.ndarray],
                        entries: dict[str, CatalogEntry]) -> Examples | None:
    """Archived impressions whose attribution window has closed, labelled by the archived clicks.

    The user features are the ones each impression logged at serving (``user_mean``,
    ``user_count``): what the ranker saw then. Today's vectors in Redis already hold
    the clicks being predicted (each click's own update among them), so a model trained
    or gated on them would learn from the label. Rows that logged no features (written
    by another producer, or before the features were logged), whose user has no state
    any more (erased), or whose ad has no embedding are left out. Only the archive's
    hours of the training window (``TRAIN_WINDOW_S`` before the newest settled
    impression) are read, newest first, and at most the newest ``MAX_EXAMPLES`` kept.
    """
    root = archive_of(settings)
    newest = await asyncio.to_thread(archive.newest_ts, root, "impressions")
    if newest is None:
        return None
    until = newest - settings.attribution_window_s  # labels of newer ones may still change
    since = until - settings.train_window_s
    # only the window's hours, newest first, at most MAX_EXAMPLES rows: bounded whatever the archive's age
    imps = await asyncio.to_thread(archive.read_recent, root, "impressions", since=since, until=until,
                                   limit=MAX_EXAMPLES, columns=EXAMPLE_COLUMNS)
    if imps.num_rows == 0:
        return None
    ts = imps.column("ts").to_numpy()
    # a click comes after its impression: its label is in the hours from the oldest kept impression on
    labels = await asyncio.to_thread(archive.read_recent, root, "labels", since=float(ts.min()),
                                     columns=["impression_id", "value"])
    event_ids = np.asarray(imps.column("event_id").to_pylist(), dtype=object)
    user_ids = np.asarray(imps.column("user_id").to_pylist(), dtype=object)
    ad_ids = np.asarray(imps.column("ad_id").to_pylist(), dtype=object)
    served = [unpack_served(m, settings.d_user) for m in imps.column("user_mean").to_pylist()]
    served_count = imps.column("user_count").to_pylist()
    values = dict(zip(labels.column("impression_id").to_pylist(), labels.column("value").to_pylist(), strict=True))
    distinct = list(dict.fromkeys(user_ids.tolist()))
    # only whether each user still has a state is read, never its values; and an erased user's rows from before
    # the erasure are left out even once the same id has a state again (the archive's compaction may not have run)
    store = UserStore(r, settings.partitions)
    present = {u for u, exists in zip(distinct, await store.exist_many(distinct), strict=True) if exists}
    alive = without_erased(user_ids.tolist(), ts, await store.erased_since(distinct))
    keep = np.array([v is not None and c is not None and u in present and a in embeddings
                     for v, c, u, a in zip(served, served_count, user_ids, ad_ids, strict=True)], dtype=bool) & alive
    if not keep.any():
        return None
    rows = np.flatnonzero(keep)
    raw = imps.column("raw").take(rows).to_pylist()
    request_ids = imps.column("request_id").take(rows).to_pylist()
    groups = {rid: i for i, rid in enumerate(dict.fromkeys(request_ids))}
    kept_ads = ad_ids[keep]
    value = [values.get(e) for e in event_ids[keep]]
    contexts = [orjson.loads(j).get("context") for j in raw]
    propensity = imps.column("propensity").take(rows).to_pylist()
    return Examples(
        ads=np.stack([embeddings[a] for a in kept_ads]),
        users=np.stack([cast(np.ndarray, served[i]) for i in rows]),
        clicked=np.array([e in values for e in event_ids[keep]], dtype=np.float32),
        ts=ts[rows],
        counts=np.array([served_count[i] for i in rows], dtype=np.int64),
        bids=np.array([entries[a].bid for a in kept_ads], dtype=np.float32),
        category=np.array([category_id(entries[a].category) for a in kept_ads], dtype=np.int64),
        context=np.stack([context_ids(c) for c in contexts]) if raw else np.zeros((0, MAX_CONTEXT_TOKENS), np.int64),
        position=imps.column("position").take(rows).to_numpy(zero_copy_only=False).astype(np.int64),
        value=np.array([np.nan if v is None else v for v in value], dtype=np.float32),
        group=np.array([groups[g] for g in request_ids], dtype=np.int64),
        ad_ids=kept_ads,
        event_ids=event_ids[keep],
        policy=np.asarray(imps.column("policy").take(rows).to_pylist(), dtype=object),
        propensity=np.array([np.nan if p is None else p for p in propensity], dtype=np.float64),
        contexts=_objects(contexts),
    )


def _objects(items: list) -> np.ndarray:
    """A 1-d object array of ``items`` (``np.array`` would make an array of dicts' keys or nested lists)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def served_users(ex: Examples | None, d_user: int) -> np.ndarray | None:
    """The posterior means retrieval will be queried with: the archive's distinct users, and the cold-start prior.

    Returns
    -------
    ndarray, shape (m, d_user), or None without examples (the index then tunes on synthetic queries).
    """
    if ex is None:
        return None
    return np.vstack([np.unique(ex.users, axis=0), np.zeros((1, d_user), np.float32)])


def holdout_pctr(projector: Projector, ex: Examples, bias: float) -> np.ndarray:
    """``σ(u · p(ad) + b)`` of each row under ``projector``, shape (n,)."""
    return sigmoid((ex.users * projector.project(ex.ads)).sum(1) + bias)


def split(ex: Examples) -> tuple[Examples, Examples]:
    """Older ``1 − HOLDOUT`` for training, the newest ``HOLDOUT`` for the gate."""
    cut = int(len(ex.clicked) * (1 - HOLDOUT))
    return ex.take(slice(0, cut)), ex.take(slice(cut, None))


def choose_projector(served: Projector, ex: Examples | None, settings: Settings,
                     trainer: Callable[..., Projector]) -> tuple[Projector, dict]:
    """Train a candidate on the older examples; keep it only if it is not worse on the newest."""
    if ex is None or len(ex.clicked) < MIN_EXAMPLES:
        return served, {"trained": False, "reason": f"fewer than {MIN_EXAMPLES} labelled impressions"}
    train, hold = split(ex)
    if train.clicked.min() == train.clicked.max():
        return served, {"trained": False, "reason": "training examples have a single class"}
    bias = logit(settings.base_rate)
    candidate = trainer(train.ads, train.users, train.clicked, served, bias=bias, seed=settings.seed)
    p_cand, p_base = holdout_pctr(candidate, hold, bias), holdout_pctr(served, hold, bias)
    cand = Scores(auc=auc(hold.clicked, p_cand), log_loss=log_loss(hold.clicked, p_cand))
    base = Scores(auc=auc(hold.clicked, p_base), log_loss=log_loss(hold.clicked, p_base))
    _, se = auc_difference(hold.clicked, p_cand, p_base)
    verdict = gate(cand, base, auc_se=se)
    info = {"trained": True, "examples": len(ex.clicked), "holdout": len(hold.clicked),
            "candidate": asdict(cand), "served": asdict(base), "auc_gain_se": se,
            "promoted": verdict.promote, "reason": verdict.reason}
    if not verdict.promote:
        log.warning("candidate projector rejected: %s", verdict.reason)
        return served, info
    return candidate, info


def ranker_data(ex: Examples, projector: Projector) -> ranking.LabelledRows:
    rows = build_rows(ex.users, ex.counts, projector.project(ex.ads), ex.bids, ex.category, ex.context, ex.position)
    return ranking.LabelledRows(rows, ex.clicked, ex.value, ex.group)


def popularity_scores(train: Examples, hold: Examples, prior: float, strength: float = 20.0) -> np.ndarray:
    """Each holdout row's ad's smoothed training CTR ``(clicks + s·prior) / (shown + s)``, shape (n_hold,)."""
    shown: dict[str, float] = {}
    clicks: dict[str, float] = {}
    for a, y in zip(train.ad_ids.tolist(), train.clicked.tolist(), strict=True):
        shown[a] = shown.get(a, 0.0) + 1.0
        clicks[a] = clicks.get(a, 0.0) + y
    return np.array([(clicks.get(a, 0.0) + strength * prior) / (shown.get(a, 0.0) + strength)
                     for a in hold.ad_ids.tolist()])


def _scores(y: np.ndarray, p: np.ndarray, group: np.ndarray) -> Scores:
    return Scores(auc=auc(y, p), log_loss=log_loss(y, p), ndcg_at_10=ndcg_at_k(group, y, p, 10))


def served_factors(train: Examples, hold: Examples, train_pctr: np.ndarray, settings: Settings) -> np.ndarray:
    """The calibration factor serving would multiply into each held-out row's pCTR, from the training rows alone.

    Serving never ranks by a model's pCTR alone: it multiplies in each ad's factor, the
    posterior mean of ``AdEvidence`` from the ad's clicks against the clicks the model
    predicted for it, with its category's pooled factor as the prior (``ranker.scoring``).
    Here the counts are the training rows' (every arm's), predicted by the model being
    judged, and the categories are the ranker's hashed buckets (the rows do not carry the
    exact ones serving pools over).

    Parameters
    ----------
    train, hold : Examples
    train_pctr : ndarray, shape (n_train,)
        The model's top-position pCTR of each training row.

    Returns
    -------
    ndarray, shape (n_hold,)
    """
    ads, inverse = np.unique(np.r_[train.ad_ids, hold.ad_ids].astype(str), return_inverse=True)
    inverse = inverse.ravel()
    n_train = len(train.clicked)
    seen, hold_of = inverse[:n_train], inverse[n_train:]
    clicks = np.bincount(seen, weights=train.clicked.astype(np.float64), minlength=ads.size)
    expected = np.bincount(seen, weights=np.asarray(train_pctr, np.float64), minlength=ads.size)
    group_of = np.zeros(ads.size, np.int64)
    group_of[inverse] = np.r_[train.category, hold.category]
    buckets, groups = np.unique(group_of, return_inverse=True)
    _, means = pooled_factors(clicks, expected, groups, buckets.size, settings.category_strength,
                              settings.calibration_strength)
    return means[hold_of]


def choose_ranker(served: RankerModel | None, ex: Examples | None, projector: Projector, settings: Settings,
                  fitter: Callable[..., ranking.Fitted] = ranking.fit) -> tuple[RankerModel | None, dict]:
    """Train the ranker and the logistic baseline; serve the better if it is not worse than the served policy.

    The gate judges each model as serving uses it: its pCTR at the top position (what
    ``/recommend`` ranks by) times each ad's calibration factor from the training rows
    (``served_factors``), on the held-out rows. Judged without the factors, a ranker
    that only learns which ads are clicked (what the factors already hold) would look
    far better than the stream's ``σ(u·p + b)``, and be promoted for it. The scores
    without the factors, at the logged positions, are reported beside
    (``uncalibrated``).
    """
    if ex is None or len(ex.clicked) < MIN_EXAMPLES:
        return served, {"trained": False, "reason": f"fewer than {MIN_EXAMPLES} labelled impressions"}
    train_ex, hold_ex = split(ex)
    if train_ex.clicked.min() == train_ex.clicked.max():
        return served, {"trained": False, "reason": "training examples have a single class"}
    train, hold = ranker_data(train_ex, projector), ranker_data(hold_ex, projector)
    y, g = hold.clicked, hold.group
    fitted = {kind: fitter(train, kind, epochs=settings.ranker_epochs, init=served, seed=settings.seed)
              for kind in ("dcn", "logistic")}
    models = {kind: ranking.export(f) for kind, f in fitted.items()}
    scores = {kind: _scores(y, sigmoid(m.click_logits(hold.rows)), g) for kind, m in models.items()}
    scores["popularity"] = _scores(y, popularity_scores(train_ex, hold_ex, float(train.clicked.mean())), g)
    bias = logit(settings.base_rate)
    if served is not None:
        base = _scores(y, sigmoid(served.click_logits(hold.rows)), g)
    else:  # what is served without a ranker: the stream's own σ(u·p + b)
        base = _scores(y, sigmoid(hold.rows.dot + bias), g)
    kind = max(("dcn", "logistic"), key=lambda k: (scores[k].auc, -scores[k].log_loss))
    # as served: every candidate at the top position (the same features, another position), times its ad's factor
    top = [replace(d.rows, position=np.zeros_like(d.rows.position)) for d in (train, hold)]

    def as_served(model: RankerModel | None) -> np.ndarray:
        train_p, hold_p = (sigmoid(model.click_logits(r) if model is not None else r.dot + bias) for r in top)
        return np.minimum(hold_p * served_factors(train_ex, hold_ex, train_p, settings), 1.0)

    p_cand, p_base = as_served(models[kind]), as_served(served)
    cand_served, base_served = _scores(y, p_cand, g), _scores(y, p_base, g)
    _, se = auc_difference(y, p_cand, p_base)
    verdict = gate(cand_served, base_served, auc_se=se)
    info = {"trained": True, "kind": kind, "holdout": len(y),
            "train_examples_per_s": round(fitted[kind].examples_per_s),
            "candidate": asdict(cand_served), "served": asdict(base_served), "auc_gain_se": se,
            "uncalibrated": {"candidate": asdict(scores[kind]), "served": asdict(base)},
            "baselines": {k: asdict(scores[k]) for k in ("logistic", "popularity")},
            "promoted": verdict.promote, "reason": verdict.reason}
    if kind != "dcn":
        info["dcn"] = asdict(scores["dcn"])
    if not verdict.promote:
        log.warning("candidate ranker rejected: %s", verdict.reason)
        return served, info
    return models[kind], info


def click_recall(catalog: ServingCatalog, hold: Examples, k: int = 500, limit: int = 2000) -> float | None:
    """Share of held-out clicks whose ad is among the ``k`` retrieved for that user (None without clicks)."""
    rows = np.flatnonzero(hold.clicked > 0)[-limit:]
    if rows.size == 0:
        return None
    hits = 0
    for i in rows:
        hits += catalog.row.get(hold.ad_ids[i], -1) in set(catalog.retrieve(hold.users[i], k).tolist())
    return round(hits / rows.size, 4)


EVIDENCE_CHUNK = 65_536  # rows scored at once by evidence_offsets


def predicted_counts(ex: Examples | None, projector: Projector, ranker: RankerModel | None,
                     settings: Settings) -> dict[str, dict[str, list[float]]]:
    """Per arm and ad: the rows' clicks, impressions and the clicks a model predicts for them.

    Each row is predicted by ``projector`` and ``ranker`` from the features it logged at
    serving (the user as served), so the sums are that model's view of the ads'
    evidence over these rows (``ranker.scoring.AdEvidence``). A ranker predicts at the
    top position, whatever the row's: that is the pCTR ``/recommend`` logs with every
    impression and the live counts add up (``RankerModel.request_logits``), so the two
    parts of a version's evidence are on one scale and the factor absorbs the
    position effect the same way in both.

    Returns
    -------
    dict
        arm → ad id → [clicks, impressions, expected clicks].
    """
    out: dict[str, dict[str, list[float]]] = {}
    n = 0 if ex is None else len(ex.clicked)
    for start in range(0, n, EVIDENCE_CHUNK):  # in chunks: the features of 1M rows at once cost gigabytes
        assert ex is not None
        part = ex.take(slice(start, start + EVIDENCE_CHUNK))
        rows = ranker_data(replace(part, position=np.zeros_like(part.position)), projector).rows
        logits = ranker.click_logits(rows) if ranker is not None else rows.dot + logit(settings.base_rate)
        pctr = sigmoid(logits)
        for arm, ad, y, p in zip(part.policy.tolist(), part.ad_ids.tolist(), part.clicked.tolist(), pctr.tolist(),
                                 strict=True):
            b = out.setdefault(arm, {}).setdefault(ad, [0.0, 0.0, 0.0])
            b[0] += y
            b[1] += 1.0
            b[2] += p
    return out


def evidence_offsets(ex: Examples | None, projector: Projector, ranker: RankerModel | None, settings: Settings,
                     live: dict[str, dict[str, list[int]]]) -> EvidenceOffsets:
    """Each ad's evidence as a newly promoted model sees it, as offsets to the live counts.

    The calibration factor of an ad compares its clicks with the clicks the served
    model predicted for its impressions (``ranker.scoring.AdEvidence``). Those
    predictions were the previous model's: under a new projector or ranker they are
    on another scale. So the new version's evidence is rebuilt from the training
    window's logged impressions, each predicted by the *new* model from the features
    logged at serving (``predicted_counts``), and only the counts that come after it
    are added live: ``effective = base + (live − live at this cycle)``. Impressions
    between the end of the window (the attribution window ago) and this cycle are in
    neither.

    Parameters
    ----------
    ex : Examples or None
        The training window's rows (None: none; every ad then starts from its prior).
    live : policy → ad id → [clicks, shown, µ-expected]
        The counts in Redis now (``AdCountLog.snapshot``).

    Returns
    -------
    EvidenceOffsets
        arm → ad id → (clicks, expected clicks) to add to the live counts.
    """
    base = predicted_counts(ex, projector, ranker, settings)
    out: EvidenceOffsets = {}
    for arm in live.keys() | base.keys():
        now, new = live.get(arm, {}), base.get(arm, {})
        out[arm] = {ad: (new.get(ad, [0.0, 0.0, 0.0])[0] - now.get(ad, [0, 0, 0])[0],
                         new.get(ad, [0.0, 0.0, 0.0])[2] - now.get(ad, [0, 0, 0])[2] / EXPECTED_SCALE)
                    for ad in now.keys() | new.keys()}
    return out


OPE_REQUESTS = 500  # the newest held-out treatment requests re-ranked for the off-policy estimates
OPE_DRAWS = 32
OPE_EVIDENCE_ROWS = 200_000  # the newest training rows each version's evidence is rebuilt from, for the estimates


def counts_before(train: Examples, version: ModelVersion, settings: Settings) -> AdCounts:
    """The per-ad counts as ``version`` would have held them when the held-out requests were served.

    Today's counts in Redis hold the held-out impressions' own clicks: a policy
    re-ranked with them would have its calibration factors and popularity already
    knowing which held-out ads were clicked. These are rebuilt from the training
    rows alone (the newest ``OPE_EVIDENCE_ROWS``, all of them older than every
    held-out row), each predicted by ``version``'s own model (``predicted_counts``),
    the way a promotion rebuilds a version's evidence.
    """
    part = train.take(slice(max(0, len(train.clicked) - OPE_EVIDENCE_ROWS), None))
    counts = AdCounts()
    counts.reset({arm: {ad: [round(c), round(s), round(e * EXPECTED_SCALE)] for ad, (c, s, e) in ads.items()}
                  for arm, ads in predicted_counts(part, version.projector, version.ranker, settings).items()})
    return counts


def off_policy_values(examples: Examples, versions: dict[str, ModelVersion], settings: Settings) -> dict[str, Any]:
    """SNIPS and DR estimates of each version's CTR on the held-out treatment requests, beside the on-policy CTR.

    The held-out part is ``split(examples)[1]``. Only whole requests of the treatment
    arm with logged propensities enter (the newest ``OPE_REQUESTS``). Each version
    re-ranks them with the slates ``/recommend`` would build (``learner.replay.rerank``)
    from the user as served (the logged ``user_mean``/``user_count``; the prior
    precision, which is not logged) and with the ads' evidence as it stood before the
    held-out part, in that version's terms (``counts_before``); ``π_e`` is the share
    of ``OPE_DRAWS`` Monte-Carlo lists. The served policy's on-policy value is the
    held-out requests' observed CTR.

    Returns
    -------
    dict
        ``requests``, ``rows``, ``on_policy_ctr`` and, per version name, each
        estimator's ``OPEResult.to_dict()``; ``skipped`` with the reason when too few
        requests qualify.
    """
    train, hold = split(examples)
    ok = (hold.policy == TREATMENT) & np.isfinite(hold.propensity)
    bad = np.unique(hold.group[~ok])
    groups = np.unique(hold.group[ok])
    groups = groups[~np.isin(groups, bad)][-OPE_REQUESTS:]
    idx = np.flatnonzero(np.isin(hold.group, groups))
    if groups.size < 20:
        return {"skipped": f"{groups.size} held-out treatment requests with propensities (fewer than 20)"}
    rows = Rows(request_id=[str(g) for g in hold.group[idx]], user_id=[f"r{g}" for g in hold.group[idx]],
                ad_id=[str(a) for a in hold.ad_ids[idx]], position=hold.position[idx],
                propensity=hold.propensity[idx], clicked=hold.clicked[idx], value=hold.value[idx],
                policy=[str(p) for p in hold.policy[idx]], context=list(hold.contexts[idx]), ts=hold.ts[idx])
    log = rows.to_log("clicked")
    served = request_states(log, list(hold.users[idx]), hold.counts[idx].tolist(), settings)
    out: dict[str, Any] = {"requests": int(groups.size), "rows": len(log), "draws": OPE_DRAWS,
                           "on_policy_ctr": float(log.reward.mean()),
                           "evidence": f"rebuilt per version from the newest {OPE_EVIDENCE_ROWS} training rows"}
    for name, version in versions.items():
        # the version's evidence is the counts before the held-out part, not today's counts plus its offsets
        pol = rerank(replace(version, evidence=None), rows, log, {}, counts_before(train, version, settings),
                     settings, seed=settings.seed, draws=OPE_DRAWS, name=name, request_states=served)
        out[name] = {k: r.to_dict() for k, r in evaluate(pol, log, ("snips", "dr"), seed=settings.seed).items()}
    return out


async def run_cycle(settings: Settings, reason: str = "scheduled",
                    trainer: Callable[..., Projector] = train_projector) -> dict:
    """Build and publish one model version; returns its manifest."""
    models = models_of(settings)
    r = connect(settings.redis_url)
    try:
        catalog_store, pointer = CatalogStore(r), ModelPointer(r)
        current = await pointer.get()
        served_ranker = None
        loaded: Projector | None = None
        parent = None
        unreadable: list[str] = []  # what of the current version could not be read
        if current is not None:
            parent = current["version"]
            loaded, served_ranker, unreadable = await asyncio.to_thread(read_served, current, models)
            if unreadable:
                log.warning("the current version %s cannot be read in full (%s): this cycle starts from %s and "
                            "publishes a new version", parent, "; ".join(unreadable),
                            "its readable parts and the initial projector" if loaded is None else "what it can read")
        # read first: whether any user lives in the served space (a user learned after this read, while a refit
        # runs, is learned in the space being replaced: possible only around the very first users)
        total, learned = await UserStore(r, settings.partitions).population_sum(settings.d_user)
        # the change id first: anything changed after it is replayed by readers as a delta
        change = await catalog_store.last_change()
        ids = await catalog_store.all_ids()
        progress.stage(f"learner cycle ({reason}): reading the catalog's {len(ids)} ads")
        entries, embs = [], []
        for i in range(0, len(ids), READ_CHUNK):
            chunk, emb = await catalog_store.read(ids[i:i + READ_CHUNK])
            entries += chunk
            embs.append(emb)
        emb_all = np.concatenate(embs) if embs else np.zeros((0, settings.d_ad), np.float32)
        fit = fit_of(current)
        refit = current is None or loaded is None or (learned == 0 and refittable(current))
        if refit:
            # no user lives in the user space yet, so it may still follow the catalog (see initial_projector);
            # users learned before any version were learned under the workers' default, the seeded random map.
            # A current projector that cannot be read is made again the way its manifest says it was made: the
            # seeded random map, else the catalog's fit (a trained one is lost: the nearest the learner can make)
            on = np.array([e.active for e in entries], dtype=bool)
            rebuilt_like = fit_of(current) if current is not None and loaded is None else None
            follow = (learned == 0 or rebuilt_like not in (None, RANDOM_FIT)) and on.sum() >= 2  # 2 ads to fit
            fit = CATALOG_FIT if follow else RANDOM_FIT
            loaded = await asyncio.to_thread(initial_projector, settings.d_ad, settings.d_user, settings.seed,
                                             emb_all[on] if follow else None)
        assert loaded is not None  # the served version's, or initial when there was none
        progress.stage("learner cycle: reading the training window of the archive")
        examples = await load_examples(settings, r, {e.ad_id: v for e, v in zip(entries, emb_all, strict=True)},
                                       {e.ad_id: e for e in entries})
        served = loaded
        n = 0 if examples is None else len(examples.clicked)
        progress.stage(f"learner cycle: training and gating the projector on {n} examples")
        projector, proj_eval = await asyncio.to_thread(choose_projector, served, examples, settings, trainer)
        progress.stage("learner cycle: training and gating the ranker")
        ranker, rank_eval = await asyncio.to_thread(choose_ranker, served_ranker, examples, projector, settings)
        progress.stage(f"learner cycle: building the index of {int(sum(e.active for e in entries))} ads")
        serving = await asyncio.to_thread(
            ServingCatalog.build, projector.d_user, [e.ad_id for e in entries], projector.project(emb_all),
            np.array([e.bid for e in entries], dtype=np.float32), np.array([e.active for e in entries], dtype=bool),
            [e.category for e in entries], exact_below=settings.exact_index_below, seed=settings.seed,
            users=served_users(examples, settings.d_user))
        evaluation = {"projector": proj_eval, "ranker": rank_eval,
                      "click_recall_at_500": None if examples is None else click_recall(serving, split(examples)[1])}
        if projector is not served:
            fit = TRAINED_FIT
        changed = [name for name, same in (("projector", projector is served and not refit),
                                           ("ranker", ranker is served_ranker)) if not same] + ["index"]
        evidence: EvidenceOffsets | None
        rebuild = "projector" in changed or "ranker" in changed
        if rebuild:  # another model: its own view of the ads' evidence, as offsets to the per-ad counts now
            snapshot = (await AdCountLog(r).snapshot(ARMS))[0]
            rebuilt = await asyncio.to_thread(evidence_offsets, examples, projector, ranker, settings, snapshot)
            evidence = rebuilt
            evaluation["evidence"] = {"rebuilt": True, "ads": sum(len(v) for v in rebuilt.values()),
                                      "from_examples": 0 if examples is None else len(examples.clicked)}
        else:  # the same model: the served version's evidence goes on (none if it cannot be read)
            evidence = None if current is None else _read_evidence(current, unreadable, models)
            evaluation["evidence"] = {"rebuilt": False}
        prior = population_prior(total, learned, settings.population_strength)
        progress.stage(f"learner cycle: publishing the version to {models}")
        manifest = await asyncio.to_thread(write_version, models, projector, serving, {
            "parent": parent, "catalog_change": change, "reason": reason, "evaluation": evaluation,
            "changed": changed, "population": {"users": learned, "strength": settings.population_strength,
                                               "prior_norm": round(float(np.linalg.norm(prior)), 6)},
            **({"recovered": {"from": parent, "unreadable": unreadable}} if unreadable else {})},
            ranker, prior, fit, evidence)
        if examples is not None:  # on the version as written (re-ranking re-keys a catalog: not the one saved)
            manifest["evaluation"]["off_policy"] = await _off_policy(settings, models, examples,
                                                                     None if unreadable else current, manifest)
            # not announced yet: nobody reads it before the pointer moves
            await asyncio.to_thread(write_manifest, manifest, models)
        await pointer.set(manifest)
        removed = await asyncio.to_thread(collect_garbage, models, settings.keep_versions, manifest["version"],
                                  settings.control_version if settings.control_policy == "pinned" else None)
    finally:
        await r.aclose()
    announce(settings, manifest)
    log.info("published %s (%d ads; removed %s)", manifest["version"], manifest["index"]["size"], removed)
    return manifest


def read_served(current: dict, models: Objects | None = None) -> tuple[Projector | None, RankerModel | None,
                                                                       list[str]]:
    """What a cycle can read of the current version: its projector and ranker (None where it cannot), and why not.

    A ranker is expected when the manifest names one (its ranker's ``type`` other than the
    stream's own ``thompson-logistic``) or its file is there.

    Returns
    -------
    projector, ranker : the current version's, or None
    unreadable : list of str
        One line per artifact that could not be read (empty when all could).
    """
    unreadable: list[str] = []
    projector = ranker = None
    try:
        path = version_dir(current, models)
    except Exception as e:  # noqa: BLE001 - the same as a file that cannot be read
        return None, None, [f"version: {reason_of(e)}"]
    try:
        projector = Projector.load(path / "projector.npz")
    except Exception as e:  # noqa: BLE001 - reported and replaced: the learner must always be able to publish
        unreadable.append(f"projector: {reason_of(e)}")
    if current.get("ranker", {}).get("type", "thompson-logistic") != "thompson-logistic" \
            or (path / "ranker.npz").exists():
        try:
            ranker = RankerModel.load(path / "ranker.npz")
        except Exception as e:  # noqa: BLE001 - the same: trained again, or served without one
            unreadable.append(f"ranker: {reason_of(e)}")
    return projector, ranker, unreadable


def _read_evidence(current: dict, unreadable: list[str], models: Objects) -> EvidenceOffsets | None:
    """The current version's evidence offsets, or None when they cannot be read (added to ``unreadable``)."""
    try:
        return load_evidence(version_dir(current, models))
    except Exception as e:  # noqa: BLE001 - the live counts are used as they are
        unreadable.append(f"evidence: {reason_of(e)}")
        return None


async def _off_policy(settings: Settings, models: Objects, examples: Examples, current: dict | None,
                      written: dict) -> dict[str, Any]:
    """``off_policy_values`` of the new version and of the served one; never stops a cycle (a failure is logged)."""
    try:
        versions = {"candidate": await asyncio.to_thread(load_version, written, models)}
        if current is not None:
            versions["served"] = await asyncio.to_thread(load_version, current, models)
        return await asyncio.to_thread(off_policy_values, examples, versions, settings)
    except Exception as e:  # noqa: BLE001 - an estimate, not a reason to keep the catalog or the users waiting
        log.warning("off-policy estimates failed: %s: %s", type(e).__name__, e)
        return {"skipped": f"failed: {type(e).__name__}: {e}"}


def announce(settings: Settings, manifest: dict) -> None:
    """Produce the ``model-updates`` event for a published version."""
    producer = make_producer(settings.kafka_servers)
    try:
        event = {"version": manifest["version"], "ts": manifest["built_at"], "path": manifest["path"],
                 "changed": manifest["changed"], "index": manifest["index"]}
        producer.send(MODEL_UPDATES, key=manifest["version"].encode(), value=orjson.dumps(event)).get(timeout=10)
    finally:
        producer.close(timeout=5)


def run_loop(settings: Settings) -> None:
    """Run a cycle now and then every ``learner_interval_s`` until SIGTERM/SIGINT."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # the loop shares the machine with the workers and the API: training must not take every core
    torch.set_num_threads(settings.learner_threads)
    # each step on its own: a failure is logged once (and again only with another reason), retried with backoff
    compaction = Step("erasure compaction", log)  # retried at its next period: the erasures wait in Redis
    check = Step("drift/catalog check", log, max_s=30.0)  # a missed check only delays the next cycle
    # a failed cycle leaves the served version as it is and is retried sooner than the schedule, backing off to it
    cycle = Step("learner cycle (the served version is unchanged)", log, base_s=5.0,
                 max_s=settings.learner_interval_s)
    next_run, last_cycle, last_check, next_compaction = 0.0, 0.0, 0.0, 0.0
    seen_change: str | None = None
    while not stop:
        if time.monotonic() >= next_compaction:
            next_compaction = time.monotonic() + settings.erasure_compaction_s
            try:
                asyncio.run(_compact(settings))
                compaction.succeeded()
            except Exception as e:  # noqa: BLE001 - see the step's comment
                compaction.failed(e)
        reason = "scheduled" if time.monotonic() >= next_run else None
        if reason is None and check.due() and time.monotonic() - last_check >= 1.0:
            last_check = time.monotonic()
            try:
                reason, seen_change = asyncio.run(unscheduled(settings, last_cycle, seen_change))
                check.succeeded()
            except Exception as e:  # noqa: BLE001 - see the step's comment
                check.failed(e)
        if reason:
            last_cycle = time.time()
            try:
                asyncio.run(run_cycle(settings, reason=reason))
                cycle.succeeded()
                next_run = time.monotonic() + settings.learner_interval_s
            except Exception as e:  # noqa: BLE001 - see the step's comment
                next_run = time.monotonic() + cycle.failed(e)
        time.sleep(0.2)


# an embedding no ad has used for this long is deleted (an ad whose text comes back within it needs no encoding)
EMBEDDING_GRACE_S = 3600.0


async def _compact(settings: Settings) -> None:
    """The periodic upkeep: the archive's retention and erasures, and the embeddings no ad uses any more."""
    r = connect(settings.redis_url)
    try:
        await compact_archive(settings, r)
        dropped = await CatalogStore(r).drop_unused_embeddings(time.time(), EMBEDDING_GRACE_S)
        if dropped:
            log.info("dropped %d embeddings no ad has used for %.0f s", dropped, EMBEDDING_GRACE_S)
    finally:
        await r.aclose()


async def unscheduled(settings: Settings, last_cycle: float, seen_change: str | None) -> tuple[str | None, str]:
    """Whether to run a cycle before the schedule, and the catalog's newest change id now.

    ``"drift"`` when a worker flagged drift after ``last_cycle``; ``"catalog"`` when
    the served projector may still follow the catalog (``ranker.artifacts.refittable``, no user learned) and the
    catalog changed since the served version and has been quiet since the
    previous check (``seen_change``), so that a catalog being loaded is fit once,
    whole, not per batch.
    """
    r = connect(settings.redis_url)
    try:
        if await QualityBoard(r).drift_since(last_cycle):
            return "drift", seen_change or ""
        current = await ModelPointer(r).get()
        change = await CatalogStore(r).last_change()
        if current is None or not refittable(current) or change in (current.get("catalog_change"), "0-0") \
                or change != seen_change:
            return None, change
        _, learned = await UserStore(r, settings.partitions).population_sum(settings.d_user)
        return ("catalog" if learned == 0 else None), change
    finally:
        await r.aclose()
