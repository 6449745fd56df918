"""``privads replay``: estimate a policy's CTR on logged impressions (I/O around ``learner.offline``).

Policies:

* ``uniform`` — every ad of the log's action set equally likely at each slot;
* ``popularity`` — slot j shows the log's j-th best ad by click rate;
* ``logged`` — the logging policy itself (IPS/SNIPS must give the on-policy CTR);
* ``current`` — the served model version (the Redis pointer), evaluated through
  the same retrieval, ranker and Thompson sampling code as ``/recommend``;
* a model version: a directory ``…/models/<version>`` or its name in ``PRIVADS_DATA``.

For the model policies each logged request is re-ranked with the user as
served: the ``user_mean``/``user_count`` its rows logged (``logged_states``).
A request that logged none takes the user's posterior as it is in Redis *now*
(the prior for unknown or erased users), which has learned from the very
impressions being evaluated; the arm's per-ad counts are always today's. The
report's notes say how many requests took which. ``π_e(ad | slot)`` is the
share of ``draws`` Monte-Carlo lists that put the ad in that slot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from privads.infra import progress
from privads.infra.errors import LogError
from privads.infra.objects import local_copy, models_of
from privads.infra.records import unpack_served
from privads.infra.settings import Settings
from privads.infra.store import AdCountLog, ModelPointer, UserStore, connect
from privads.learner.erasure import erased_of, without_erased
from privads.learner.estimators import CIMethod
from privads.learner.logs import Rows, format_of, read_logs
from privads.learner.offline import (
    ESTIMATORS,
    Log,
    PolicyRows,
    evaluate,
    logged_policy,
    policy_rows,
    popularity_policy,
    uniform_policy,
)
from privads.ranker import experiment
from privads.ranker.adcounts import AdCounts, RowCounts
from privads.ranker.artifacts import MANIFEST, ModelVersion, load_version, prior_or, read_manifest
from privads.ranker.features import context_ids
from privads.ranker.policy import Slate, ThompsonParams, ThompsonPolicy
from privads.ranker.service import arm_evidence, learned_slate, rekey_now, retrieve

SIMPLE_POLICIES = ("uniform", "popularity", "logged")


def parse_estimators(text: str) -> tuple[str, ...]:
    names = tuple(e.strip() for e in text.split(",") if e.strip())
    unknown = [e for e in names if e not in ESTIMATORS]
    if not names or unknown:
        raise LogError(f"--estimators: unknown {unknown or text!r}; choose from {','.join(ESTIMATORS)}")
    return names


def run(settings: Settings, logs: Path | str, policy: str, estimators: tuple[str, ...], fmt: str | None = None, *,
        ci: CIMethod = "normal", n_bootstrap: int = 500, seed: int = 0, draws: int = 256,
        reward: str = "clicked", registry: bool = False) -> dict[str, Any]:
    """The JSON report of ``privads replay``.

    ``registry``: read the stack's erasure registry (``settings.redis_url``) and leave out
    the rows of users erased after them (``learner.erasure``); the report says whether it was read.
    """
    progress.stage(f"replay: reading {logs}")
    with local_copy(logs, settings) as path:  # an s3:// URL: read from a copy on this host
        rows = read_logs(path, fmt)
    progress.stage(f"replay: {len(rows)} rows read")
    erasures: dict[str, Any] = {"registry_read": registry, "rows_left_out": 0}
    if registry and rows.actions is None:
        keep = without_erased(rows.user_id, rows.ts, asyncio.run(erased_of(settings, rows.user_id)))
        erasures["rows_left_out"] = int((~keep).sum())
        if not keep.all():
            rows = rows.take(keep)
        if len(rows) == 0:
            raise LogError(f"{logs}: every row is of an erased user")
    log = rows.to_log(reward)
    if policy in SIMPLE_POLICIES:
        pol = {"uniform": lambda: uniform_policy(log, np.random.default_rng(seed)),
               "popularity": lambda: popularity_policy(log), "logged": lambda: logged_policy(log)}[policy]()
    else:
        if rows.actions is not None:
            raise LogError(f"--policy {policy}: a served model can only be replayed on PrivAds' own logs "
                           "(jsonl/parquet from export-logs), whose ads it knows")
        pol = asyncio.run(_model_policy(settings, policy, rows, log, seed=seed, draws=draws))
    progress.stage(f"replay: {', '.join(estimators)} on {len(log)} rows, " + (
        "analytic intervals" if ci == "normal" else f"{n_bootstrap} bootstrap resamples"))
    results = evaluate(pol, log, estimators, ci=ci, n_bootstrap=n_bootstrap, seed=seed)
    intervals = ("analytic: delta method; DM adds the reward model's influence, replay of clicks uses Wilson"
                 if ci == "normal" else f"percentile bootstrap over rows, {n_bootstrap} resamples; DM and DR refit "
                 "the reward model on each")
    return {
        "logs": str(logs), "format": fmt or format_of(logs), "policy": pol.name, "reward": reward,
        "rows": len(log), "requests": int(len(np.unique(log.request))), "actions": len(log.actions),
        "positions": log.positions, "logged_mean_reward": float(log.reward.mean()),
        "propensities_logged": int((~np.isnan(log.pscore)).sum()), "intervals": intervals, "notes": pol.notes,
        "estimators": {name: r.to_dict() for name, r in results.items()}, "erasures": erasures,
    }


def _manifest_for(settings: Settings, policy: str, current: dict | None) -> dict:
    if policy == "current":
        if current is None:
            raise LogError("--policy current: no model version is served yet (run `privads train`)")
        return current
    path = Path(policy)
    if (path / MANIFEST).is_file():
        return read_manifest(path.parent, path.name)
    models = models_of(settings)
    try:
        return read_manifest(models, policy)
    except FileNotFoundError:
        raise LogError(f"--policy: {policy!r} is neither uniform, popularity, logged, current, nor a model version "
                       f"(directory, or name in {models})") from None


async def _model_policy(settings: Settings, policy: str, rows: Rows, log: Log, *, seed: int,
                        draws: int) -> PolicyRows:
    r = connect(settings.redis_url)
    try:
        manifest = _manifest_for(settings, policy, await ModelPointer(r).get())
        version = await asyncio.to_thread(load_version, manifest, models_of(settings))
        users = sorted(set(rows.user_id))
        states = dict(zip(users, await UserStore(r, settings.partitions).get_many(users), strict=True))
        snapshot, _ = await AdCountLog(r).snapshot(experiment.ARMS)
    finally:
        await r.aclose()
    counts = AdCounts()
    counts.reset(snapshot)
    return rerank(version, rows, log, states, counts, settings, seed=seed, draws=draws,
                  name=f"model {version.version}" + (" (current)" if policy == "current" else ""),
                  request_states=logged_states(rows, log, settings))


def logged_states(rows: Rows, log: Log, settings: Settings) -> dict[int, tuple]:
    """Each request's user as served, from the features its first row logged (request index → state).

    The precision is not logged: the prior's stands in (a user's grows slowly; it only scales the draws' noise).
    """
    if rows.user_mean is None or rows.user_count is None:
        return {}
    return request_states(log, [unpack_served(m, settings.d_user) for m in rows.user_mean], rows.user_count,
                          settings)


def request_states(log: Log, means: list[np.ndarray | None], counts: list[int | None],
                   settings: Settings) -> dict[int, tuple]:
    """Request index → (mean, precision, count) from each request's first row that has both.

    Parameters
    ----------
    means : list of ndarray of shape (D,) or None, one per row of ``log``
    counts : list of int or None, one per row of ``log``
    """
    precision = np.full(settings.d_user, settings.prior_precision, np.float32)
    out: dict[int, tuple] = {}
    for req, mean, count in zip(log.request.tolist(), means, counts, strict=True):
        if req not in out and mean is not None and count is not None:
            out[req] = (mean, precision, int(count))
    return out


def rerank(version: ModelVersion, rows: Rows, log: Log, states: dict[str, tuple | None], counts: AdCounts,
           settings: Settings, *, seed: int, draws: int, name: str,
           request_states: dict[int, tuple] | None = None) -> PolicyRows:
    """``version``'s Thompson policy on every logged request, with the slates ``/recommend`` would build.

    A user without state starts from the version's population prior, as on ``/recommend``.
    ``request_states``: each request's user as it was served (request index → (mean,
    precision, count), from the features logged with its impressions), used instead of
    ``states`` (each user's one state, today's) wherever it has the request.
    """
    cat = version.catalog
    policy = ThompsonPolicy(ThompsonParams.from_settings(settings, draws), version.ranker, np.random.default_rng(seed))
    prior_mean = prior_or(version.prior, np.zeros(settings.d_user, np.float32))
    prior_precision = np.full(settings.d_user, settings.prior_precision, np.float32)
    action_of = {a: i for i, a in enumerate(log.actions)}
    first_row: dict[int, int] = {}
    for i, req in enumerate(log.request.tolist()):
        first_row.setdefault(req, i)
    # the version's view of the ads' evidence (ranker.artifacts.EVIDENCE), as /recommend holds it for its arm
    row_counts = {arm: RowCounts(cat, arm, (version.evidence or {}).get(arm)) for arm in experiment.ARMS}
    for rc in row_counts.values():
        rc.sync(counts)
    # retrieval keys follow the treatment's evidence, as /recommend's do; each arm's category factors its priors
    rekey_now(cat, row_counts[experiment.TREATMENT], settings)
    factors = {arm: arm_evidence(cat, rc, settings)[0] for arm, rc in row_counts.items()}
    unknown = today = 0

    bar = progress.bar(f"replay: re-ranking with {version.version}", total=len(first_row), unit="req")

    def slate_of(req: int) -> tuple[Slate, np.ndarray]:
        nonlocal unknown, today
        bar.update(1)
        i = first_row[req]
        state = (request_states or {}).get(req)
        if state is None:
            today += 1
            state = states.get(rows.user_id[i])
            unknown += state is None
        mean, precision, count = state if state else (prior_mean, prior_precision, 0)
        cand = retrieve(cat, mean, settings.candidates)
        arm = experiment.TREATMENT if rows.policy[i] != experiment.CONTROL else experiment.CONTROL
        slate = learned_slate(cat, row_counts[arm], factors[arm], cat.take(cand), rows.user_id[i],
                              (mean, precision, count), context_ids(rows.context[i]), None)
        return slate, np.array([action_of.get(a, -1) for a in cat.ids_of(cand)], dtype=np.int64)

    with bar:
        out = policy_rows(policy, log, slate_of, draws=draws, rng=np.random.default_rng(seed), name=name)
    out.notes.append(f"re-ranked {len(first_row)} logged requests with {draws} Monte-Carlo draws each "
                     f"(π_e standard error ≤ {0.5 / np.sqrt(draws):.3f})")
    served = len(first_row) - today
    if served:
        out.notes.append(f"{served} requests re-ranked from the user as served (the features logged with them)")
    if today:
        out.notes.extend([
            f"{today} requests logged no user features: their users' posteriors are today's in Redis, which have "
            "learned from these very impressions, so the estimate is optimistic for a policy that exploits them",
            f"{unknown} of them have no state now (erased, or never labelled): scored from the prior"])
    out.notes.append("per-ad counts are today's: they hold these impressions' own clicks")
    return out
