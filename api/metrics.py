"""Prometheus metrics of the API process, defined once."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from redis.exceptions import NoPermissionError

from privads.infra.store import UserStore, memory_use


class ApiMetrics:
    """One registry per app, so several apps (tests) never collide."""

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
        self.impressions_queued = Gauge("privads_impression_queue_depth", "records waiting for Kafka", registry=r)
        self.impressions_dropped = Gauge("privads_impressions_dropped_total", "records dropped: queue full", registry=r)
        self.produce_failed = Gauge("privads_produce_failed_total", "records Kafka refused", registry=r)
        self.impressions_unconfirmed = Gauge(
            "privads_impressions_unconfirmed_total", "impressions answered before Kafka confirmed them (a SIGKILL "
            "of the API could lose these)", registry=r)
        self.journal_write_failed = Gauge(
            "privads_impressions_unjournaled_total", "impressions' batches the journal could not write (disk full, "
            "or Kafka away long enough to fill it): a SIGKILL of the API could lose these", registry=r)
        self.journal_replayed = Gauge("privads_impressions_replayed_total", "impressions of dead API processes' "
                                      "journals sent to Kafka by this one", registry=r)
        self.journal_segments = Gauge("privads_journal_segments", "this process's journal files waiting for Kafka",
                                      registry=r)
        self.catalog_size = Gauge("privads_index_size", "ads in the served index", registry=r)
        self.events_processed = Gauge("privads_events_processed_total", "events processed by the stream workers",
                                      ["topic"], registry=r)
        self.consumer_lag = Gauge("privads_consumer_lag", "messages not yet consumed by the stream workers",
                                  ["topic"], registry=r)
        self.model = Info("privads_model", "served model version", registry=r)
        self.online_auc = Gauge("privads_online_auc", "rolling AUC of served pCTR vs outcomes", registry=r)
        self.online_log_loss = Gauge("privads_online_log_loss", "rolling log-loss of served pCTR", registry=r)
        self.drifts = Gauge("privads_drift_total", "drifts detected in the served model's predictions", registry=r)
        self.dp_epsilon = Gauge("privads_dp_epsilon", "ε of the most-updated user vector (DP mode)", registry=r)
        # resources (README: Resource limits): Redis' memory against its ceiling, and the archive's backlog
        self.redis_used = Gauge("privads_redis_used_memory_bytes", "Redis used_memory", registry=r)
        self.redis_max = Gauge("privads_redis_maxmemory_bytes", "Redis maxmemory (0: no ceiling)", registry=r)
        self.redis_evicting = Gauge("privads_redis_evicting", "1 when Redis' maxmemory-policy deletes keys at the "
                                    "ceiling (anything but noeviction): state may be lost", registry=r)
        self.archive_pending_age = Gauge(
            "privads_archive_oldest_pending_seconds", "age of the oldest committed batch still waiting in Redis "
            "for the Parquet archive (grows while the drain cannot write, e.g. a full disk; 0: none)", registry=r)


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
