"""Topic upkeep against a real (empty) tansu broker: what a worker does after a broker restart."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiokafka.errors import KafkaConnectionError

from helpers import topic_partitions
from privads.infra import records
from privads.infra.kafka import keep_topics, make_producer
from privads.infra.processes import free_port

pytestmark = pytest.mark.integration


def test_keep_topics_creates_the_missing_ones_once_and_reports_a_foreign_partition_count(empty_broker: str) -> None:
    # a producer gets there first, as after a broker restart: the broker's default count (4), not ours (3)
    producer = make_producer(empty_broker)
    try:
        producer.send(records.CLICKS, b"{}").get(10)
    finally:
        producer.close()
    auto = topic_partitions(empty_broker)[records.CLICKS]
    assert auto != 3

    created, mismatched = asyncio.run(keep_topics(empty_broker, 3))
    want = records.topic_partitions(3)
    assert set(created) == set(want) - {records.CLICKS}
    assert mismatched == {records.CLICKS: auto}
    have = topic_partitions(empty_broker)
    assert {t: have[t] for t in want if t != records.CLICKS} == {t: n for t, n in want.items() if t != records.CLICKS}

    again = asyncio.run(keep_topics(empty_broker, 3))
    assert again == ([], {records.CLICKS: auto})


def test_keep_topics_is_refused_clearly_without_a_broker_and_gives_up_on_one_that_never_answers() -> None:
    with pytest.raises(KafkaConnectionError):
        asyncio.run(keep_topics(f"127.0.0.1:{free_port()}", 3))
    # a socket that accepts connections and never answers: the call must end, not hang the worker's loop
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            asyncio.run(keep_topics(f"127.0.0.1:{silent.getsockname()[1]}", 3, timeout=2.0))
        assert time.monotonic() - started < 30
    finally:
        silent.close()
