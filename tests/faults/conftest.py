"""Fixtures of the fault-injection suite: a fresh broker and redis-server per test, and the test's processes.

Each fault test gets its own broker and redis-server (they start in well under a
second), so its exact counts see no other test's events. Everything a test
starts (workers, API, learner, streams) is stopped in teardown, even when the
test fails half-way or killed the process itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from faults.harness import Box, Fleet, fault_settings, start_box
from privads.infra.settings import Settings


@pytest.fixture
def box(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Box]:
    # parametrised indirectly with the broker's storage ("memory", the default, or "s3"), or "cluster": the
    # memory broker and a Redis Cluster
    param = getattr(request, "param", "memory")
    if param == "cluster":
        b = start_box(tmp_path, redis_topology="cluster")
    else:
        b = start_box(tmp_path, param)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def fsettings(box: Box) -> Settings:
    return fault_settings(box)


@pytest.fixture
def fleet(fsettings: Settings) -> Iterator[Fleet]:
    f = Fleet(fsettings)
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
def r(box: Box) -> Iterator[redis.Redis]:
    """A client of the box's Redis (a cluster client on a cluster); it reconnects by itself after a restart."""
    client = box.client()
    yield client
    client.close()
