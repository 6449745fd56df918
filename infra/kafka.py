"""Kafka plumbing shared by every process: topic creation and a non-blocking producer.

``QueuedProducer`` never blocks its caller: records go into a bounded in-memory
queue drained by a background thread into a kafka-python producer. When the
queue is full the record is dropped and counted, never silently lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streams.records import topic_partitions

log = logging.getLogger(__name__)


def create_topics(servers: str, partitions: int, timeout: float = 30.0) -> list[str]:
    """Create every PrivAds topic with an explicit partition count; returns the ones created.

    Topics that already exist are left as they are. Retries until the broker
    answers or ``timeout`` passes (the embedded broker may still be starting).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=servers, client_id="privads-admin", request_timeout_ms=5000)
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(t, n, 1) for t, n in topic_partitions(partitions).items() if t not in existing]
        created = []
        for topic in wanted:  # one at a time: a race with another creator must not fail the rest
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def consumer_lag(servers: str, group: str, topics: Iterable[str]) -> dict[str, int]:
    """Messages in ``topics`` not yet committed by consumer ``group``, per topic.

    Reads the group's committed offsets without joining the group.
    """
    topics = list(topics)
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=group, client_id="privads-lag",
                             enable_auto_commit=False, request_timeout_ms=5000)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        ends = consumer.end_offsets(parts)
        lag: dict[str, int] = {t: 0 for t in topics}
        for tp, end in ends.items():
            lag[tp.topic] += max(0, end - (consumer.committed(tp) or 0))
        return lag
    finally:
        consumer.close(autocommit=False)


def make_producer(servers: str, **overrides: object) -> KafkaProducer:
    """A kafka-python producer (murmur2 partitioner, like Java's) for raw bytes."""
    config: dict[str, object] = dict(
        bootstrap_servers=servers,
        client_id="privads",
        acks=1,
        linger_ms=5,
        retries=5,
        max_block_ms=10_000,
    )
    config.update(overrides)
    return KafkaProducer(**config)


class QueuedProducer:
    """Produce without ever blocking the caller.

    Parameters
    ----------
    servers : str
        Bootstrap servers.
    capacity : int
        Records held in memory while Kafka is slow or unreachable.
    """

    def __init__(self, servers: str, capacity: int) -> None:
        self.servers = servers
        self.queue: queue.Queue[tuple[str, bytes | None, bytes]] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="privads-producer", daemon=True)
        self._thread.start()

    def send(self, topic: str, key: str | None, value: bytes) -> bool:
        """Queue one record; False (and counted in ``dropped``) when the queue is full."""
        try:
            self.queue.put_nowait((topic, key.encode() if key is not None else None, value))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def send_many(self, records: Iterable[tuple[str, str | None, bytes]]) -> int:
        return sum(self.send(t, k, v) for t, k, v in records)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def _connect(self) -> KafkaProducer | None:
        try:
            return make_producer(self.servers)
        except KafkaError as e:
            log.warning("producer cannot reach Kafka (%s); %d records queued", e, self.depth)
            return None

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1
        log.warning("produce failed: %s", exc)

    def _run(self) -> None:
        producer: KafkaProducer | None = None
        while not self._stop.is_set() or not self.queue.empty():
            if producer is None:
                producer = self._connect()
                if producer is None:
                    self._stop.wait(1.0)
                    continue
            try:
                topic, key, value = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                future = producer.send(topic, key=key, value=value)
                future.add_errback(self._on_error)
                self.sent += 1
            except KafkaError as e:
                self._on_error(e)
        if producer is not None:
            producer.flush(timeout=5)
            producer.close(timeout=5)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued (up to ``timeout``) and stop."""
        self._stop.set()
        self._thread.join(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is empty (records handed to the Kafka client)."""
        deadline = time.monotonic() + timeout
        while not self.queue.empty():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
