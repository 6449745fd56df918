"""The one settings object. Built once at start-up (``Settings()``), then passed down.

Nothing else in PrivAds reads ``os.environ``: child processes receive their
configuration through the environment that the supervisor hands them, which this
object reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CLUSTER_SCHEME = "redis+cluster"
S3_SCHEME = "s3"
REDIS_SCHEMES = ("redis", "rediss", "unix", CLUSTER_SCHEME)


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """The seed nodes, user and password of a ``redis+cluster://[user:password@]host:port[,host:port…]`` URL.

    Raises
    ------
    ValueError
        Naming what is wrong: no node, or a node without a port.
    """
    rest = url.split("://", 1)[1].split("/", 1)[0]
    user = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, _, password = auth.partition(":")
        user, password = unquote(user) or None, unquote(password) or None
    nodes = []
    for part in filter(None, rest.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"PRIVADS_REDIS: cluster node {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"PRIVADS_REDIS: {CLUSTER_SCHEME}:// names no node")
    return nodes, user, password


class Settings(BaseSettings):
    """PrivAds configuration, from ``PRIVADS_*`` environment variables (README.md, "Configuration")."""

    model_config = SettingsConfigDict(env_prefix="PRIVADS_", extra="ignore", populate_by_name=True)

    # the public configuration (README.md, "Configuration")
    kafka: str | None = Field(None, description="bootstrap servers; unset → embedded broker")
    redis: str | None = Field(None, description="Redis URL; unset → embedded redis-server")
    data: str = Field("./.privads", description="data dir, or an s3://bucket[/prefix] URL for the model versions, "
                      "the archive and the exports (logs, journals and the embedded servers then stay in LOCAL_DATA)")
    local_data: Path = Field(Path("./.privads"), description="this host's own directory when PRIVADS_DATA is an "
                             "s3:// URL: logs, the API's journal, the embedded servers' files, a cache of the model "
                             "versions it loaded (unused when PRIVADS_DATA is a directory: that is the host's own)")
    # the standard AWS variables, read as AWS SDKs read them (no PRIVADS_ prefix)
    aws_endpoint_url: str | None = Field(None, validation_alias=AliasChoices("AWS_ENDPOINT_URL"),
                                         description="the S3 endpoint of an s3:// PRIVADS_DATA (unset: AWS's)")
    aws_access_key_id: str | None = Field(None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"))
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_REGION"))
    api: str = Field("http://127.0.0.1:8000", description="where the CLI finds the API")

    catalog: Path | None = Field(Path("data/sample_ads.jsonl"), description="sample catalog loaded by `up`")

    # embedded infrastructure
    embedded_kafka_port: int = 9092
    embedded_broker_storage: Literal["memory", "s3"] = Field(
        "memory", description="where the embedded broker keeps its log: in memory (lost when it stops), or in an "
        "embedded S3-compatible server (localbucket) under PRIVADS_DATA/broker, kept across restarts")
    embedded_s3_port: int = Field(9400, description="port of the embedded S3-compatible server (broker storage s3)")
    embedded_redis_port: int = 6379
    # 1 GiB at the README's figures ("Resource limits"): 300k users active within USER_IDLE_S at the 2 KiB bound,
    # 2M impressions waiting out their attribution window at ~140 B, 20k ads' embeddings at 1.5 KiB, with ~100 MB
    # to spare; a ceiling, not a reservation
    redis_maxmemory: str = Field("1gb", pattern=r"(?i)^[0-9]+(b|[kmg]b?)?$", description="maxmemory of the embedded "
                                 "redis-server (and docker-compose.yml's), which runs with maxmemory-policy "
                                 "noeviction: at the limit writes are refused and retried, never keys evicted; "
                                 "0: no limit")
    partitions: int = Field(4, ge=1, le=256, description="partitions per source topic")

    # model
    d_user: int = Field(64, ge=2, le=1024)
    d_ad: int = 384
    encoder_backend: str = Field("onnx-int8", pattern="^(onnx-int8|torch)$", description="MiniLM runtime")
    seed: int = 0

    # online learning (per labelled impression)
    # 0.4: the best last-quarter efficiency of `privads bench policies` among 0.2-1.6 (BENCHMARKS.md)
    learning_rate: float = Field(0.4, gt=0)
    max_step: float = Field(1.0, gt=0, description="clip on the norm of one update step")
    # 0: every impression is a step now (fast negatives), and a pull per step toward the prior outweighed the
    # clicks (bench policies, 3 seeds: 0.01 lost 0.05-0.08 of last-quarter efficiency); the prior enters once,
    # as the population-prior start of a new user
    l2_prior: float = Field(0.0, ge=0, description="pull toward the population mean, per update")
    prior_precision: float = Field(16.0, gt=0, description="initial diagonal precision")
    population_strength: float = Field(10.0, ge=0, description="pseudo-users at the zero vector in the population "
                                       "prior (the mean of the learned users' vectors a new user starts from)")
    base_rate: float = Field(0.05, gt=0, lt=1, description="prior CTR (global bias)")
    attribution_window_s: float = Field(1800.0, gt=0)
    dedupe_horizon_s: float = Field(1800.0, ge=0, description="impression ids remembered after their window")
    max_event_ahead_s: float = Field(300.0, gt=0, description="an event stamped further than this past the worker's "
                                     "clock is dead-lettered: one bad timestamp must not move a partition's clock")
    worker_group: str = Field("privads-worker", min_length=1, description="the workers' Kafka consumer group")
    worker_batch: int = Field(20_000, ge=1, description="max events per worker batch")
    archive_every_s: float = Field(5.0, gt=0, description="how often workers move the archive to Parquet")
    dp_clip: float | None = Field(None, gt=0, description="set to clip each update (differential privacy)")
    dp_noise: float = Field(1.0, ge=0, description="DP noise multiplier σ (noise std = σ · clip)")
    dp_delta: float = Field(1e-6, gt=0, lt=1)

    # serving
    candidates: int = Field(500, ge=1, le=10000)
    propensity_draws: int = Field(64, ge=1, le=4096)
    exploration: float = Field(0.3, ge=0, description="scale of Thompson-sampling noise")
    control_share: float = Field(0.1, ge=0, le=1, description="share of users in the control arm")
    control_policy: Literal["popularity", "random", "pinned"] = Field(
        "popularity", description="the control arm: non-personalised popularity, uniform random, or a pinned version")
    control_version: str | None = Field(None, description="the model version the `pinned` control serves")
    arm_salt: str = Field("privads-arm-v1", min_length=1, description="salt of the user → arm hash")
    shortlist: int = Field(50, ge=1, le=10000, description="candidates in the Monte-Carlo (≥ 3k)")
    calibration_strength: float = Field(5.0, gt=0, description="prior weight, in clicks, of each ad's calibration "
                                        "factor (its clicks over the clicks the served model predicted)")
    category_strength: float = Field(5.0, gt=0, description="prior weight, in clicks, of each category's pooled "
                                     "calibration factor, the prior mean of its ads' factors")
    taste_strength: float = Field(2.0, ge=0, description="prior weight, in clicks, of each user's own factor on "
                                  "a category (their clicks on its ads over the clicks expected of them); 0: off")
    taste_window: float = Field(0.0, ge=0, description="impressions of a category that a user's taste on it "
                                "weighs at most: past them its counts are scaled back, so a changed taste is "
                                "followed (0: never)")
    rekey_tolerance: float = Field(0.1, ge=0, description="an ad's retrieval key follows its calibration factor "
                                   "once the factor has moved by more than this, in log")
    popularity_prior_strength: float = Field(20.0, gt=0, description="the base rate's weight, in impressions, in "
                                             "the popularity control's per-ad Beta")
    popularity_refresh_s: float = Field(2.0, gt=0, description="how often the popularity control re-ranks")
    candidate_cache: int = Field(4096, ge=0, description="requests' candidates and ranker scores kept for repeat "
                                 "requests of users whose state has not moved (about 6 KB each; 0: off)")
    impression_queue: int = Field(100_000, ge=1, description="impressions held in memory while Kafka is away")
    impression_journal: bool = Field(True, description="write each request's impressions to a local journal "
                                     "(PRIVADS_DATA/journal) until Kafka acknowledges them, so an API process "
                                     "killed with impressions in its queue loses none (infra/journal.py)")
    impression_confirm_s: float = Field(0.0, ge=0, description="when > 0, /recommend answers once Kafka confirmed "
                                        "its impressions, waiting at most this long (0: at once, the default)")
    api_key: SecretStr | None = Field(None, description="when set, every state-changing endpoint (/recommend "
                                      "included) needs it in X-API-Key")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS; empty: CORS off")
    request_timeout_s: float = Field(2.0, gt=0, description="a request still running after this answers 503")
    api_workers: int = Field(1, ge=1, le=64, description="API processes (uvicorn workers) sharing the port")
    api_threads: int = Field(1, ge=1, le=64, description="BLAS/OpenMP threads per API process")
    # issue 16: auth / bounded input
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024, description="the largest request body the "
                                "API reads; a larger one is answered 413 before it is parsed")

    # learner
    exact_index_below: int = Field(50_000, ge=1, description="catalogs smaller than this get an exact index")
    learner_interval_s: float = Field(300.0, gt=0)
    archive_retention_s: float = Field(30 * 24 * 3600.0, gt=0, description="the archive keeps this many seconds of "
                                       "hours (at least TRAIN_WINDOW_S); older hour directories are removed")
    user_idle_s: float = Field(30 * 24 * 3600.0, gt=0, description="a user whose state no event has changed for this "
                               "long is forgotten (its key, and its share of the population prior)")
    topic_retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="retention.ms the topics are created with: "
                                     "how long an erased user's events may stay in Kafka")
    erasure_compaction_s: float = Field(300.0, gt=0, description="how often the learner removes erased users' "
                                        "rows from the archive's files (README: Privacy and security)")
    train_window_s: float = Field(7 * 86400.0, gt=0, description="the learner trains on the archive's impressions "
                                  "of this long before the newest settled one (at most 1M, the newest)")
    keep_versions: int = Field(3, ge=1)
    ranker_epochs: int = Field(3, ge=1, le=100, description="passes over the training examples per cycle")
    learner_threads: int = Field(1, ge=1, description="torch threads of the periodic learner loop")

    # supervisor
    stop_timeout_s: float = Field(25.0, gt=0)

    @field_validator("kafka", "redis", "catalog", "dp_clip", "control_version", "api_key", "aws_endpoint_url",
                     "aws_access_key_id", "aws_secret_access_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("data", mode="before")
    @classmethod
    def _data_url(cls, v: object) -> object:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, str) and "://" in v:
            scheme, rest = v.split("://", 1)
            if scheme != S3_SCHEME:
                raise ValueError(f"PRIVADS_DATA: {scheme}:// is not supported; a directory or s3://bucket[/prefix]")
            if not rest.split("/", 1)[0]:
                raise ValueError("PRIVADS_DATA: s3:// names no bucket")
        elif v == "":
            raise ValueError("PRIVADS_DATA is blank: a directory or s3://bucket[/prefix]")
        return v

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in REDIS_SCHEMES:
            raise ValueError(f"PRIVADS_REDIS must start with one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
        if scheme == CLUSTER_SCHEME:
            cluster_nodes(v)
        return v

    @model_validator(mode="after")
    def _pinned_needs_a_version(self) -> Settings:
        if self.control_policy == "pinned" and not self.control_version:
            raise ValueError("PRIVADS_CONTROL_POLICY=pinned needs PRIVADS_CONTROL_VERSION (a model version id)")
        return self

    @property
    def tastes(self) -> float:
        """The tastes' prior weight as used (``taste_strength``); 0, no tastes kept or read, under differential
        privacy: they count the user's clicks exactly, and ε covers only what the noised mechanism made of them."""
        return 0.0 if self.dp_clip is not None else self.taste_strength

    @property
    def api_host(self) -> str:
        return urlparse(self.api).hostname or "127.0.0.1"

    @property
    def api_port(self) -> int:
        return urlparse(self.api).port or 8000

    @property
    def kafka_servers(self) -> str:
        """Bootstrap servers, once infrastructure is resolved."""
        if not self.kafka:
            raise RuntimeError("PRIVADS_KAFKA is not set and no embedded broker is running")
        return self.kafka

    @property
    def redis_url(self) -> str:
        if not self.redis:
            raise RuntimeError("PRIVADS_REDIS is not set and no embedded redis-server is running")
        return self.redis

    @property
    def data_on_s3(self) -> bool:
        """Whether PRIVADS_DATA is an object store (``s3://``) rather than a directory."""
        return str(self.data).startswith(f"{S3_SCHEME}://")  # str: model_copy(update=…) does not validate

    @property
    def local(self) -> Path:
        """This host's own directory: PRIVADS_DATA itself, or LOCAL_DATA when PRIVADS_DATA is on S3."""
        return self.local_data if self.data_on_s3 else Path(self.data)

    @property
    def models_dir(self) -> Path:
        """Local model files: the encoder's runtime cache, and the model versions when PRIVADS_DATA is a directory
        (on S3 they are in the bucket, ``infra.objects.models_of``, and this host keeps a cache of those it loaded)."""
        return self.local / "models"

    @property
    def journal_dir(self) -> Path:
        """The API processes' impression journals (``infra/journal.py``): on this host's disk."""
        return self.local / "journal"

    def child_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        # None is written as "" (blank means unset), so that it overrides a value inherited from the parent
        env = {}
        for name, value in self.model_dump().items():
            alias = type(self).model_fields[name].validation_alias
            key = alias.choices[0] if isinstance(alias, AliasChoices) else f"PRIVADS_{name.upper()}"
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = json.dumps(value)  # pydantic-settings reads complex fields as JSON
            env[str(key)] = "" if value is None else str(value)
        return env
