"""Fixtures shared by the infra tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from privads.infra.processes import broker_process, free_port


@pytest.fixture
def empty_broker(tmp_path: Path) -> Iterator[str]:
    """A tansu broker of its own, with no topic yet; its bootstrap address."""
    port = free_port()
    broker = broker_process(port, tmp_path / "broker.log")
    try:
        broker.start(30)
        yield f"127.0.0.1:{port}"
    finally:
        broker.stop(10)
