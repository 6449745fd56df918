"""Unit tests for the settings object (``infra.settings``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from privads.infra.settings import Settings, cluster_nodes


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # settings must not depend on whatever PRIVADS_* variables the test runner inherited
    for name in list(os.environ):
        if name.upper().startswith("PRIVADS_"):
            monkeypatch.delenv(name)


def _from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """What a child process started with ``env`` would build."""
    for name in list(os.environ):
        if name.upper().startswith("PRIVADS_"):
            monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


def test_contract_defaults():
    s = Settings()
    assert s.data == "./.privads" and s.local == Path("./.privads") and not s.data_on_s3
    assert s.api == "http://127.0.0.1:8000"
    assert s.kafka is None and s.redis is None
    assert s.api_host == "127.0.0.1" and s.api_port == 8000
    assert s.models_dir == Path("./.privads") / "models"
    assert s.d_user == 64 and s.d_ad == 384


def test_unresolved_infrastructure_raises():
    s = Settings()
    with pytest.raises(RuntimeError, match="PRIVADS_KAFKA"):
        _ = s.kafka_servers
    with pytest.raises(RuntimeError, match="PRIVADS_REDIS"):
        _ = s.redis_url


def test_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVADS_KAFKA", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("PRIVADS_REDIS", "redis://cache:6379/2")
    monkeypatch.setenv("PRIVADS_D_USER", "32")
    monkeypatch.setenv("PRIVADS_DATA", str(tmp_path))
    monkeypatch.setenv("PRIVADS_EXPLORATION", "0.25")
    s = Settings()
    assert s.kafka == "broker-1:9092,broker-2:9092" and s.kafka_servers == s.kafka
    assert s.redis == "redis://cache:6379/2" and s.redis_url == s.redis
    assert s.d_user == 32 and isinstance(s.d_user, int)
    assert s.local == tmp_path and s.models_dir == tmp_path / "models"
    assert s.exploration == 0.25


def test_blank_kafka_and_redis_count_as_unset(monkeypatch):
    monkeypatch.setenv("PRIVADS_KAFKA", "")
    monkeypatch.setenv("PRIVADS_REDIS", "")
    s = Settings()
    assert s.kafka is None and s.redis is None
    assert Settings(kafka="", redis="").kafka is None


@pytest.mark.parametrize(("name", "value"), [
    ("PRIVADS_D_USER", "abc"),
    ("PRIVADS_D_USER", "1"),
    ("PRIVADS_PARTITIONS", "0"),
    ("PRIVADS_CONTROL_SHARE", "1.5"),
    ("PRIVADS_BASE_RATE", "1"),
    ("PRIVADS_CONTROL_POLICY", "greedy"),
    ("PRIVADS_LEARNING_RATE", "0"),
])
def test_invalid_values_raise_validation_error(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(("api", "host", "port"), [
    ("http://example.org:9001", "example.org", 9001),
    ("http://10.0.0.5", "10.0.0.5", 8000),
    ("http://[::1]:8123", "::1", 8123),
    ("http://api.internal:80/", "api.internal", 80),
])
def test_api_host_and_port(monkeypatch, api, host, port):
    monkeypatch.setenv("PRIVADS_API", api)
    s = Settings()
    assert (s.api_host, s.api_port) == (host, port)


def test_child_env_shape():
    env = Settings(kafka="k:9092").child_env()
    assert all((k.startswith("PRIVADS_") or k.startswith("AWS_")) and k == k.upper() for k in env)
    assert all(isinstance(v, str) for v in env.values())
    assert env["PRIVADS_KAFKA"] == "k:9092" and env["PRIVADS_D_USER"] == "64"
    # None is written blank, which reads back as unset and overrides a value the child would inherit
    assert env["PRIVADS_REDIS"] == ""


def test_child_env_round_trip_defaults(monkeypatch):
    s = Settings()
    assert _from_env(monkeypatch, s.child_env()) == s


def test_child_env_round_trip_customised(monkeypatch, tmp_path):
    s = Settings(kafka="127.0.0.1:19092", redis="redis://127.0.0.1:16379/0", data=tmp_path / "d",
                 api="http://127.0.0.1:8123", d_user=32, partitions=2, control_share=0.0, seed=7,
                 exploration=0.3, learning_rate=0.123456789, control_policy="pinned", control_version="v123",
                 catalog=tmp_path / "ads.jsonl", api_key="s3cret", cors_origins=["https://a.example", "https://b"])
    back = _from_env(monkeypatch, s.child_env())
    assert back == s
    assert back.d_user == 32 and back.api_port == 8123 and back.learning_rate == 0.123456789


def test_data_on_s3_keeps_this_hosts_files_local_and_reads_the_standard_aws_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVADS_DATA", "s3://bucket/some/prefix")
    monkeypatch.setenv("PRIVADS_LOCAL_DATA", str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    s = Settings()
    assert s.data_on_s3 and s.data == "s3://bucket/some/prefix"
    # logs, journals, the embedded servers and the model cache: this host's directory, not the bucket
    assert s.local == tmp_path and s.journal_dir == tmp_path / "journal" and s.models_dir == tmp_path / "models"
    assert (s.aws_endpoint_url, s.aws_access_key_id, s.aws_region) == ("http://127.0.0.1:9000", "key", "eu-west-3")
    assert s.aws_secret_access_key is not None and s.aws_secret_access_key.get_secret_value() == "secret"
    env = s.child_env()  # a child reads them back under the names AWS SDKs use
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert "PRIVADS_AWS_ENDPOINT_URL" not in env
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name)
    assert _from_env(monkeypatch, env) == s


@pytest.mark.parametrize("data, why", [("gs://bucket", "gs:// is not supported"), ("s3://", "names no bucket"),
                                       ("s3:///prefix", "names no bucket"), ("", "blank")])
def test_a_bad_data_url_is_refused_naming_what_is_wrong(data, why):
    with pytest.raises(ValidationError, match=why):
        Settings(data=data)


# a None setting (catalog=None: load no sample catalog) must survive the trip to a child
def test_child_env_round_trip_catalog_none(monkeypatch):
    s = Settings(catalog=None)
    assert _from_env(monkeypatch, s.child_env()) == s


# a control policy that does not exist is refused, not silently replaced by another
def test_unknown_control_policy_is_rejected(monkeypatch):
    monkeypatch.setenv("PRIVADS_CONTROL_POLICY", "greedy")
    with pytest.raises(ValidationError, match="control_policy"):
        Settings()


# a pinned control without a version to pin is refused at start-up, naming both settings
def test_pinned_control_needs_a_version(monkeypatch):
    monkeypatch.setenv("PRIVADS_CONTROL_POLICY", "pinned")
    with pytest.raises(ValidationError, match="PRIVADS_CONTROL_VERSION"):
        Settings()
    monkeypatch.setenv("PRIVADS_CONTROL_VERSION", "v1700000000000")
    assert Settings().control_version == "v1700000000000"


# the API binds to loopback and CORS is off unless configured; no API key is required unless set
def test_serving_defaults_are_closed(monkeypatch):
    s = Settings()
    assert s.api_host == "127.0.0.1" and s.cors_origins == [] and s.api_key is None
    assert "s3cret" not in repr(Settings(api_key="s3cret"))  # the key never shows in logs


@pytest.mark.parametrize(("url", "nodes", "user", "password"), [
    ("redis+cluster://10.0.0.1:7000", [("10.0.0.1", 7000)], None, None),
    ("redis+cluster://a:1,b:2,[::1]:3/0", [("a", 1), ("b", 2), ("::1", 3)], None, None),
    ("redis+cluster://privads:s%40cret@a:1,b:2", [("a", 1), ("b", 2)], "privads", "s@cret"),
])
def test_cluster_urls_name_their_seed_nodes(monkeypatch, url, nodes, user, password):
    assert cluster_nodes(url) == (nodes, user, password)
    monkeypatch.setenv("PRIVADS_REDIS", url)
    assert Settings().redis_url == url


@pytest.mark.parametrize(("url", "says"), [
    ("redis+cluster://", "names no node"),
    ("redis+cluster://a:1,b", "'b' is not host:port"),
    ("http://localhost:6379", "must start with one of"),
    ("localhost:6379", "must start with one of"),
])
def test_a_bad_redis_url_is_refused_naming_what_is_wrong(monkeypatch, url, says):
    monkeypatch.setenv("PRIVADS_REDIS", url)
    with pytest.raises(ValidationError, match=says):
        Settings()


def test_tastes_are_off_under_differential_privacy() -> None:
    # they count clicks exactly, outside the noised mechanism that ε covers
    assert Settings(kafka="unused:1", redis="redis://unused").tastes == 2.0
    assert Settings(kafka="unused:1", redis="redis://unused", taste_strength=0.5).tastes == 0.5
    assert Settings(kafka="unused:1", redis="redis://unused", dp_clip=1.0).tastes == 0.0
