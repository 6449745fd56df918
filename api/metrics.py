"""Prometheus metrics of the API process, defined once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Metric
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from redis.exceptions import NoPermissionError

from privads.infra.store import UserStore, memory_use
from privads.ranker.quality import histogram_quantile


class Mirrored:
    """A Prometheus collector of values counted elsewhere (Redis, the producer's thread, the journal), exposed as
    the type they are: counters, and the stream's click → user-state latency as a histogram.

    Their owners count them; ``refresh_metrics`` (``api/main.py``) copies them here before each scrape.
    """

    COUNTERS = {  # name (exposed with ``_total``) → (help, label names)
        "privads_impressions_dropped": ("impression records dropped by this process: its queue for Kafka was full",
                                        ()),
        "privads_produce_failed": ("records Kafka refused (this process)", ()),
        "privads_impressions_unconfirmed": ("impressions answered before Kafka confirmed them (a SIGKILL of the API "
                                            "could lose these)", ()),
        "privads_impressions_unjournaled": ("impressions' batches the journal could not write (disk full, or Kafka "
                                            "away long enough to fill it): a SIGKILL of the API could lose these",
                                            ()),
        "privads_impressions_replayed": ("impressions of dead API processes' journals sent to Kafka by this one", ()),
        "privads_events_processed": ("events processed by the stream workers (all of them: read from Redis)",
                                     ("topic",)),
        "privads_dead_letters": ("events the stream workers dead-lettered (privads.dead-letters): undecodable, "
                                 "invalid, or clicks that match no impression of their user and ad", ()),
        "privads_drift": ("drifts detected in the served model's predictions", ()),
    }

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in self.COUNTERS}
        self.freshness_ms: dict[int, int] = {}  # histogram bound (ms) → clicks applied within it (not cumulative)

    def set(self, name: str, value: float, *labels: str) -> None:
        self.values[name][labels] = float(value)

    def collect(self) -> Iterator[Metric]:
        for name, (doc, labelnames) in self.COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=list(labelnames))
            for labels, v in sorted(self.values[name].items()):
                family.add_metric(list(labels), v)
            yield family
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in sorted(self.freshness_ms.items()):
            total += n
            if bound < FRESHNESS_INF_MS:
                buckets.append((repr(bound / 1000.0), float(total)))
        buckets.append(("+Inf", float(total)))
        yield HistogramMetricFamily("privads_freshness_seconds", "time from a click's production to the update of "
                                    "its user's state, over every click the workers applied", buckets=buckets)


# the stream workers' last freshness bound catches everything beyond the one before it
FRESHNESS_INF_MS = 10**9


@dataclass(frozen=True, slots=True)
class ServingLoad:
    """What this process's latency histogram says of its load (``ApiMetrics.serving``)."""

    requests: int  # every route
    recommend_requests: int
    errors_5xx: int
    recommend_p50_ms: float | None  # the histogram's bound at or above the quantile (None: none, or beyond the last)
    recommend_p99_ms: float | None


class ApiMetrics:
    """One registry per app, so several apps (tests) never collide.

    Names follow Prometheus' conventions: base units in the name (``_seconds``, ``_bytes``, ``_messages``,
    ``_ads``), counters as counters (``_total``); the alert rules over them are ``ops/prometheus/alerts.yml``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "privads_request_seconds", "HTTP request latency", ["method", "route", "status"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.recommendations = Counter("privads_recommendations", "recommendations served per arm", ["policy"],
                                       registry=r)
        self.recommended_ads = Counter("privads_recommended_ads", "ads shown (impressions logged) per arm",
                                       ["policy"], registry=r)
        self.mirrored = Mirrored()
        r.register(self.mirrored)
        self.impressions_queued = Gauge("privads_impression_queue_depth", "records waiting for Kafka", registry=r)
        self.journal_segments = Gauge("privads_journal_segments", "this process's journal files waiting for Kafka",
                                      registry=r)
        self.catalog_size = Gauge("privads_index_ads", "ads in the served index", registry=r)
        self.consumer_lag = Gauge("privads_consumer_lag_messages", "messages not yet consumed by the stream workers",
                                  ["topic"], registry=r)
        self.model = Info("privads_model", "served model version", registry=r)
        self.model_built = Gauge("privads_model_built_timestamp_seconds", "when the served model version was built "
                                 "(the learner publishes one every LEARNER_INTERVAL_S)", registry=r)
        self.learner_interval = Gauge("privads_learner_interval_seconds", "LEARNER_INTERVAL_S, as configured",
                                      registry=r)
        self.online_auc = Gauge("privads_online_auc", "rolling AUC of served pCTR vs outcomes", registry=r)
        self.online_log_loss = Gauge("privads_online_log_loss", "rolling log-loss of served pCTR", registry=r)
        self.dp_epsilon = Gauge("privads_dp_epsilon", "ε of the most-updated user vector (DP mode)", registry=r)
        # resources (README: Resource limits): Redis' memory against its ceiling, and the archive's backlog
        self.redis_used = Gauge("privads_redis_used_memory_bytes", "Redis used_memory", registry=r)
        self.redis_max = Gauge("privads_redis_maxmemory_bytes", "Redis maxmemory (0: no ceiling)", registry=r)
        self.redis_evicting = Gauge("privads_redis_evicting", "1 when Redis' maxmemory-policy deletes keys at the "
                                    "ceiling (anything but noeviction): state may be lost", registry=r)
        self.archive_pending_age = Gauge(
            "privads_archive_oldest_pending_seconds", "age of the oldest committed batch still waiting in Redis "
            "for the Parquet archive (grows while the drain cannot write, e.g. a full disk; 0: none)", registry=r)


    def serving(self) -> ServingLoad:
        """Requests and 5xx answered by this process, and ``POST /recommend``'s latency quantiles."""
        requests = errors = 0
        cumulative: dict[float, float] = {}  # /recommend's buckets: upper bound (s) → requests within it
        for family in self.latency.collect():
            for s in family.samples:
                if s.name.endswith("_count"):
                    requests += int(s.value)
                    errors += int(s.value) if s.labels.get("status", "").startswith("5") else 0
                elif s.name.endswith("_bucket") and s.labels.get("route") == "/recommend":
                    le = float(s.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + s.value
        bounds = sorted(cumulative)
        per_bound = {le: int(cumulative[le] - (cumulative[bounds[i - 1]] if i else 0.0))
                     for i, le in enumerate(bounds)}

        def ms(q: float) -> float | None:
            bound = histogram_quantile(per_bound, q)
            return None if bound is None or bound == float("inf") else round(bound * 1000.0, 3)

        return ServingLoad(requests, int(cumulative.get(float("inf"), 0.0)), errors, ms(0.5), ms(0.99))


async def refresh_resources(metrics: ApiMetrics, users: UserStore) -> None:
    """Set the resource gauges from Redis (``INFO memory`` and the first entry of each ``arch:{p}``)."""
    try:
        use = await memory_use(users.r)
    except NoPermissionError:  # a Redis that denies INFO: these gauges stay unset, the others are still served
        pass
    else:
        metrics.redis_used.set(use.used)
        metrics.redis_max.set(use.maxmemory)
        metrics.redis_evicting.set(int(use.evicts))
    oldest = await users.oldest_unarchived()
    metrics.archive_pending_age.set(0.0 if oldest is None else max(0.0, time.time() - oldest))
