"""Kafka plumbing shared by every process: client settings, topic creation and a non-blocking producer.

Every Kafka client PrivAds builds takes its settings from here (``consumer_config``,
``async_producer_config``, ``rdkafka_config``, ``make_producer``), so timeouts and
the partitioner are chosen once.

``QueuedProducer`` never blocks its caller: records go into librdkafka's bounded
in-memory queue. When the queue is full the record is dropped and counted, never
silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin import NewTopic as AIONewTopic
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from privads.infra.errors import Misconfigured, Unavailable
from privads.infra.journal import Journal, Token, orphans
from privads.infra.records import CONSUMED_TOPICS, topic_partitions

log = logging.getLogger(__name__)


# Group timings that make a consumer-group join take seconds: a join waits for the rebalance timeout, and the
# clients' defaults (minutes) never assigned a partition within 20 s on the embedded broker.
GROUP_TIMINGS: dict[str, int] = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000, rebalance_timeout_ms=5000,
                                     max_poll_interval_ms=60000)
# Large fetches: the workers apply whole batches, and a bare getmany loop is faster than anything after it
FETCH_SIZES: dict[str, int] = dict(fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)


def consumer_config(servers: str, **overrides: object) -> dict[str, object]:
    """aiokafka consumer settings: manual commits, from the earliest record, quick group joins, large fetches."""
    return {"bootstrap_servers": servers, "enable_auto_commit": False, "auto_offset_reset": "earliest",
            **GROUP_TIMINGS, **FETCH_SIZES, "fetch_max_wait_ms": 50, **overrides}


def async_producer_config(servers: str, **overrides: object) -> dict[str, object]:
    """aiokafka producer settings (the workers' forwards and dead letters)."""
    return {"bootstrap_servers": servers, "linger_ms": 5, "acks": 1, **overrides}


def rdkafka_config(servers: str, **overrides: object) -> dict[str, object]:
    """librdkafka (confluent-kafka) producer settings.

    Keys are partitioned with murmur2, like kafka-python's and Java's producers, so a
    user's impressions and clicks meet on one partition whichever client produced them.
    """
    return {"bootstrap.servers": servers, "partitioner": "murmur2_random", "acks": 1, "linger.ms": 20,
            **overrides}


# how long the topics keep an event (erasure cannot reach into a topic: this is the bound README states)
RETENTION_S = 7 * 24 * 3600.0


def topic_configs(retention_s: float) -> dict[str, str]:
    """The configs every PrivAds topic is created with: a time retention, explicit (not the broker's default)."""
    return {"retention.ms": str(int(retention_s * 1000)), "cleanup.policy": "delete"}


def create_topics(servers: str, partitions: int, timeout: float = 30.0, retention_s: float = RETENTION_S) -> list[str]:
    """Create every PrivAds topic with an explicit partition count and retention; returns the ones created.

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
        counts = topic_partitions(partitions)
        wanted = [NewTopic(t, n, 1, topic_configs=topic_configs(retention_s))
                  for t, n in counts.items() if t not in existing]
        created = []
        for topic in wanted:  # one at a time: a race with another creator must not fail the rest
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        routed = {t: n for t, n in counts.items() if t in CONSUMED_TOPICS}  # the ones users are partitioned over
        have = {t.get("name", t.get("topic")): len(t["partitions"]) for t in admin.describe_topics(list(routed))
                if not t.get("error_code")}
        check_partition_counts(routed, have, partitions)
        return created
    finally:
        admin.close()


def check_partition_counts(wanted: dict[str, int], have: dict[str, int], partitions: int) -> None:
    """Raise ``Misconfigured`` naming the topics whose partition count is not the one the settings give.

    A worker routes each user to partition ``owner(user, PRIVADS_PARTITIONS)`` and owns the partitions it is
    assigned: with fewer real partitions than configured its forwards name partitions that do not exist; with more,
    users are split across partitions no worker expects. Neither can run.
    """
    wrong = {t: n for t, n in have.items() if t in wanted and n != wanted[t]}
    if wrong:
        listed = ", ".join(f"{t} has {n}" for t, n in sorted(wrong.items()))
        raise Misconfigured(f"topic partition counts do not match PRIVADS_PARTITIONS={partitions}: {listed} "
                            f"(want {sorted(set(wanted.values()))}); set PRIVADS_PARTITIONS to the topics' count or "
                            "recreate the topics")


async def keep_topics(servers: str, partitions: int, timeout: float = 10.0,
                      retention_s: float = RETENTION_S) -> tuple[list[str], dict[str, int]]:
    """Create the PrivAds topics the broker lacks; report the ones with another partition count.

    The workers call it every few seconds: the embedded broker keeps nothing across a
    restart, and whoever touches a topic first after one decides its partition count
    (an auto-created topic gets the broker's default). Runs in the event loop and gives
    up after ``timeout`` seconds, so a broker that accepts a connection and never
    answers cannot stall the caller.

    Returns
    -------
    created : list[str]
        The topics created by this call.
    mismatched : dict[str, int]
        Topic → partition count, for the existing topics whose count is not the wanted one.
        The embedded broker cannot add partitions (no CreatePartitions), so the caller can
        only report them.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id="privads-admin", request_timeout_ms=5000)

    async def run() -> tuple[list[str], dict[str, int]]:
        await admin.start()
        have = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
        wanted = topic_partitions(partitions)
        created = []
        for name, n in wanted.items():
            if name in have:
                continue
            response = await admin.create_topics([AIONewTopic(name, n, 1, topic_configs=topic_configs(retention_s))])
            for topic, code, *message in response.topic_errors:  # one at a time: a racing creator fails none
                if code == 0:
                    created.append(topic)
                elif code != TopicAlreadyExistsError.errno:
                    raise KafkaError(f"creating topic {topic}: error {code} {message}")
        return created, {t: have[t] for t, n in wanted.items() if t in have and have[t] != n}

    try:
        return await asyncio.wait_for(run(), timeout)
    finally:
        await admin.close()


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
    """Produce without ever blocking the caller: librdkafka's bounded queue, drained by its own threads.

    ``send`` only appends to the queue (a few µs, no Python work per record
    afterwards); batching, retries and reconnection happen in librdkafka's C
    threads. While Kafka is unreachable records wait in the queue; a record that
    finds the queue full is dropped and counted (``dropped``), and one that
    cannot be delivered before ``timeout_s`` is counted too (``failed``): loss is
    never silent. Keys are partitioned with murmur2, like kafka-python's and Java's
    producers, so a user's impressions and clicks meet on one partition whichever
    client produced them.

    Parameters
    ----------
    servers : str
        Bootstrap servers.
    capacity : int
        Records held in memory while Kafka is slow or unreachable.
    timeout_s : float
        How long a record may wait for delivery before it is given up (and counted).
    linger_ms : float
        How long librdkafka waits to fill a batch (20 ms; 1 ms when requests wait for acknowledgements).
    journal : Journal or None
        Where ``send_batch`` writes each batch before queueing it, until Kafka acknowledges it
        (``infra/journal.py``): a process killed with records in its queue loses none of them.
    """

    def __init__(self, servers: str, capacity: int, timeout_s: float = 300.0, linger_ms: float = 20.0,
                 journal: Journal | None = None) -> None:
        from confluent_kafka import Producer

        self.servers = servers
        self.journal = journal
        self.dropped = 0
        self.failed = 0
        self._producer = Producer(rdkafka_config(
            # linger: batches amortise the broker's work; a caller that waits for acknowledgements wants it short
            servers, **{"client.id": "privads-api", "linger.ms": linger_ms, "queue.buffering.max.messages": capacity,
                        "queue.buffering.max.kbytes": 1_048_576, "message.timeout.ms": int(timeout_s * 1000),
                        "enable.idempotence": False, "log_level": 3, "logger": log,
                        # one delivery report per request comes back to Python (its last record's, when the caller
                        # asks to confirm): a callback per delivered record costs the GIL 10× per request
                        "delivery.report.only.error": False}))
        self._stop = threading.Event()
        # delivery reports are served by poll(); a thread of our own keeps them flowing between requests
        self._thread = threading.Thread(target=self._serve_reports, name="privads-producer", daemon=True)
        self._thread.start()

    def _on_delivery(self, err: object, _msg: object) -> None:
        if err is not None:
            self.failed += 1
            if self.failed in (1, 10, 100) or self.failed % 1000 == 0:
                log.warning("produce failed (%d so far): %s", self.failed, err)

    def send(self, topic: str, key: str | None, value: bytes) -> bool:
        """Queue one record; False (and counted in ``dropped``) when the queue is full."""
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
            return True
        except BufferError:
            self.dropped += 1
            return False

    def send_batch(self, topic: str, records: Sequence[tuple[str | None, bytes]],
                   confirm: asyncio.Future[bool] | None = None, journaled: bool = True) -> int:
        """Queue ``(key, value)`` records for one topic in one call; returns how many were queued.

        The ones that find the queue full are dropped and counted (``dropped``), like ``send``'s.
        Keys are still partitioned one by one (murmur2). With ``confirm``, that future (of the
        caller's event loop) gets True once Kafka acknowledged the batch's last record, False if it
        failed or was dropped. Records of one key go to one partition in order, so the last one's
        acknowledgement stands for the batch's; its failure is counted for all of them (``failed``):
        only the last record reports back, the one delivery report per batch this costs. With a
        journal (and ``journaled``), the batch is written to it first and its segment released by
        that same report; a batch not wholly queued or delivered keeps its segment for a replay.
        """
        if not records:
            if confirm is not None:
                confirm.set_result(True)
            return 0
        token = self.journal.append(topic, records) if self.journal is not None and journaled else None
        head, last = records[:-1], records[-1]
        queued = self._producer.produce_batch(topic, [{"key": k, "value": v} for k, v in head]) if head else 0
        n = len(records)
        whole = queued == len(head)

        def report(err: object, _msg: object) -> None:  # librdkafka's thread
            if err is not None:
                self._on_delivery(err, None)
                self.failed += n - 1
            if token is not None:
                self._journal_settle(token, err is None and whole)
            if confirm is not None:
                confirm.get_loop().call_soon_threadsafe(_settle, confirm, err is None and whole)

        try:
            self._producer.produce(topic, key=last[0], value=last[1], on_delivery=report)
            queued += 1
        except BufferError:
            if token is not None:
                self._journal_settle(token, False)
            if confirm is not None:
                confirm.set_result(False)
        self.dropped += n - queued
        return queued

    def _journal_settle(self, token: Token, delivered: bool) -> None:
        try:
            assert self.journal is not None
            self.journal.settle(token, delivered)
        except OSError as e:  # a file system error must not stop librdkafka's reports
            log.warning("impression journal: cannot retire a segment: %s", e)

    async def replay(self, directory: Path, timeout_s: float = 30.0) -> int:
        """Send the journal segments of dead processes in ``directory`` to Kafka; returns the records sent.

        Each orphan (``infra/journal.py: orphans``) is deleted once Kafka acknowledged every one
        of its batches. Records Kafka already had are sent again; the workers drop the
        impression ids they hold (``streams/attribution.py``).

        Raises
        ------
        Unavailable
            When Kafka did not acknowledge a segment's batches within ``timeout_s``: the segment
            stays, for the next call.
        """
        sent = 0
        with contextlib.closing(orphans(directory)) as found:
            for orphan in found:
                loop = asyncio.get_running_loop()
                futures: list[asyncio.Future[bool]] = []
                for topic, batch in orphan.frames:
                    done: asyncio.Future[bool] = loop.create_future()
                    self.send_batch(topic, batch, confirm=done, journaled=False)
                    futures.append(done)
                try:
                    results = await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
                except TimeoutError:
                    raise Unavailable(f"Kafka did not acknowledge journal segment {orphan.path.name} within "
                                      f"{timeout_s:g} s; kept for the next attempt") from None
                if not all(results):
                    raise Unavailable(f"Kafka refused records of journal segment {orphan.path.name}; kept for the "
                                      "next attempt")
                records = sum(len(b) for _, b in orphan.frames)
                if orphan.torn:
                    log.warning("impression journal: %s ended in %d bytes that were not a whole frame (a process "
                                "killed while writing a request it never answered); dropped", orphan.path.name,
                                orphan.torn)
                log.info("impression journal: replayed %d records of %s, a process that ended without delivering "
                         "them", records, orphan.path.name)
                orphan.delete()
                sent += records
        return sent

    @property
    def depth(self) -> int:
        """Records queued or in flight."""
        return len(self._producer)

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.2)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is delivered (or failed); False if some are still queued."""
        return self._producer.flush(timeout) == 0

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout``) and stop; what is left is counted as dropped."""
        left = self._producer.flush(timeout)
        self.dropped += left
        self._stop.set()
        self._thread.join(2.0)


def _settle(future: asyncio.Future[bool], ok: bool) -> None:
    if not future.done():
        future.set_result(ok)


class ConfirmingProducer:
    """Produce and wait for the broker's acknowledgement: for the writes an API answer promises are stored.

    ``/clicks`` and ``PUT /ads`` answer only once Kafka has the record, so an API
    killed right after answering loses none of them (``QueuedProducer`` would lose
    what its queue held). One callback per record comes back to Python, which is
    why the impressions, ten per request, do not go this way.

    Parameters
    ----------
    servers : str
        Bootstrap servers.
    """

    def __init__(self, servers: str) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(rdkafka_config(
            servers, **{"client.id": "privads-api-confirmed", "linger.ms": 1, "enable.idempotence": False,
                        "log_level": 3, "logger": log, "queue.buffering.max.messages": 10_000}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="privads-confirming-producer", daemon=True)
        self._thread.start()

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def send(self, topic: str, key: str | None, value: bytes, timeout_s: float) -> None:
        """Produce one record and return once the broker has it.

        Raises
        ------
        Unavailable
            When the broker did not acknowledge it within ``timeout_s`` (it may still be delivered
            later: a retry may then store it twice, which the consumers' dedupe absorbs), or refused it.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(err: object) -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(Unavailable(f"Kafka refused the record for {topic}: {err}"))

        def report(err: object, _msg: object) -> None:  # librdkafka's thread: hand over to the event loop
            loop.call_soon_threadsafe(settle, err)

        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=report)
        except BufferError:
            raise Unavailable(f"too many records waiting for Kafka; {topic} not written, retry later") from None
        try:
            await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            raise Unavailable(f"Kafka did not confirm the record for {topic} within {timeout_s:g} s; it may still "
                              "be written, retry later") from None

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is in flight (up to ``timeout``) and stop."""
        self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(2.0)
