"""The impression journal: frames that survive a torn write, segments deleted only once Kafka has them, the
segments of a killed process found and replayed to a real broker exactly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from privads.infra.journal import Journal, decode_frames, encode_ack, encode_frame, orphans
from privads.infra.kafka import QueuedProducer, create_topics

RECORDS = [("user-1", b'{"a":1}'), (None, b""), ("ünï/çødé\udcff", b"x" * 1000)]


def test_frames_round_trip_and_a_torn_or_corrupt_tail_is_cut_off() -> None:
    data = encode_frame("privads.impressions", RECORDS) + encode_frame("t", RECORDS[:1])
    frames, torn = decode_frames(data)
    assert frames == [("privads.impressions", RECORDS), ("t", RECORDS[:1])] and torn == 0
    last = encode_frame("t", RECORDS)
    for cut in (1, 7, len(last) - 1):  # killed inside the write: a prefix of the last frame
        frames, torn = decode_frames(data + last[:cut])
        assert len(frames) == 2 and torn == cut
    acked = data + encode_ack(0) + last + encode_ack(2)  # Kafka acknowledged the first and the third
    frames, torn = decode_frames(acked)
    assert frames == [("t", RECORDS[:1])] and torn == 0
    flipped = bytearray(data + last)
    flipped[-3] ^= 0xFF  # a corrupt body fails its checksum
    frames, torn = decode_frames(bytes(flipped))
    assert len(frames) == 2 and torn == len(last)


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_segment_is_deleted_once_sealed_and_acknowledged_and_kept_when_kafka_refused_a_frame(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_s=0.05)
    first = journal.append("t", RECORDS)
    second = journal.append("t", RECORDS)
    assert len(segments(tmp_path)) == 1 and segments(tmp_path)[0].endswith(".seg")
    journal.settle(first, True)
    time.sleep(0.06)
    journal.tick()  # sealed, but one frame is still unacknowledged
    assert len(segments(tmp_path)) == 1
    journal.settle(second, True)
    assert segments(tmp_path) == []

    refused = journal.append("t", RECORDS)
    journal.settle(refused, False)
    time.sleep(0.06)
    kept = journal.append("t", RECORDS)  # a new segment: the old one is sealed, done, but kept
    journal.settle(kept, True)
    assert len(segments(tmp_path)) == 2
    assert list(orphans(tmp_path)) == []  # both are still locked by this live journal
    journal.close()
    found = list(orphans(tmp_path))  # closed: the refused frame's segment is an orphan; the delivered one is gone
    assert [o.frames for o in found] == [[("t", RECORDS)]]
    assert all(o.torn == 0 for o in found)


def test_a_replay_gets_only_the_frames_kafka_did_not_acknowledge(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_s=60)
    tokens = [journal.append("t", [(f"user-{i}", b"v")]) for i in range(5)]
    for i in (0, 2, 3):
        journal.settle(tokens[i], True)
    journal.close()  # the process ends with frames 1 and 4 unacknowledged
    found = list(orphans(tmp_path))
    assert [k for o in found for _, batch in o.frames for k, _ in batch] == ["user-1", "user-4"]


def test_unacknowledged_frames_outlive_close_and_a_full_journal_stops_journaling(tmp_path: Path) -> None:
    frame_size = len(encode_frame("t", RECORDS))
    journal = Journal(tmp_path, segment_s=60, segment_bytes=frame_size, max_bytes=3 * frame_size)
    tokens = [journal.append("t", RECORDS) for _ in range(4)]
    assert [t.segment is not None for t in tokens] == [True, True, True, False]
    assert journal.stats.write_failed == 1 and journal.stats.written == 3
    journal.settle(tokens[0], True)  # its segment (one frame, sealed by the next) is deleted: room again
    assert journal.append("t", RECORDS).segment is not None
    journal.close()
    found = list(orphans(tmp_path))
    assert sum(len(o.frames) for o in found) == 3


def test_two_replayers_never_hold_one_orphan(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_s=60)
    journal.append("t", RECORDS)
    journal.close()
    first = orphans(tmp_path)
    taken = next(first)  # locked by this replayer until it moves on
    assert taken.frames == [("t", RECORDS)]
    assert list(orphans(tmp_path)) == []  # a second replayer skips it
    first.close()  # released
    assert len(list(orphans(tmp_path))) == 1


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from privads.infra.journal import Journal
    journal = Journal(Path(sys.argv[1]), segment_s=0.02)
    for i in range(50):
        journal.append("t", [(f"user-{i}", b"v" * i)])
        time.sleep(0.001)
    print("written", flush=True)
    time.sleep(60)
""")


def test_the_segments_of_a_killed_process_are_orphans_with_every_frame_written(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "written"
        assert list(orphans(tmp_path)) == []  # alive: every segment is locked
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    found = list(orphans(tmp_path))
    assert len(found) > 1  # several segments (sealed every 20 ms), none acknowledged
    keys = [k for o in found for _, batch in o.frames for k, _ in batch]
    assert keys == [f"user-{i}" for i in range(50)]  # in order, across segments


@pytest.fixture
def broker(empty_broker: str) -> str:
    create_topics(empty_broker, partitions=2)
    return empty_broker


async def consume_all(servers: str, topic: str, expect: int, timeout_s: float = 20.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=servers, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < expect and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                got += [m.value for m in batch]
        await asyncio.sleep(1.0)  # anything beyond `expect` (a record sent twice) has time to show
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            got += [m.value for m in batch]
    finally:
        await consumer.stop()
    return got


@pytest.mark.integration
def test_replay_sends_a_dead_processs_records_to_kafka_then_deletes_them(tmp_path: Path, broker: str) -> None:
    topic = "privads.impressions"
    directory = tmp_path / "journal"
    dead = Journal(directory, segment_s=60)
    values = [f"imp-{i}".encode() for i in range(30)]
    for i in range(0, 30, 10):  # three requests' impressions, never sent: the process "died" with them queued
        dead.append(topic, [(f"user-{i}", v) for v in values[i:i + 10]])
    dead.close()  # its locks go, as a killed process's do
    with open(next(directory.glob("*.seg")), "ab") as f:  # and a torn last write
        f.write(encode_frame(topic, [("user-x", b"never answered")])[:9])

    async def replay() -> tuple[int, list[bytes]]:
        live = Journal(directory)
        producer = QueuedProducer(broker, capacity=1000, journal=live)
        try:
            sent = await producer.replay(directory)
            again = await producer.replay(directory)  # nothing left: nothing sent twice
            assert again == 0
        finally:
            producer.close(5)
            live.close()
        return sent, await consume_all(broker, topic, len(values))

    sent, got = asyncio.run(replay())
    assert sent == 30 and sorted(got) == sorted(values)
    assert list(directory.iterdir()) == []  # replayed and deleted; the live journal journaled nothing


@pytest.mark.integration
def test_a_live_producer_journals_each_batch_until_kafka_has_it(tmp_path: Path, broker: str) -> None:
    directory = tmp_path / "journal"

    async def send() -> None:
        journal = Journal(directory, segment_s=0.05)
        producer = QueuedProducer(broker, capacity=1000, journal=journal)
        try:
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            producer.send_batch("privads.impressions", [("u", b"1"), ("u", b"2")], confirm=done)
            assert len(list(directory.glob("*.seg"))) == 1  # written before it is sent
            assert await asyncio.wait_for(done, 10)
            await asyncio.sleep(0.1)
            journal.tick()  # sealed, and acknowledged: gone
            assert list(directory.iterdir()) == []
        finally:
            producer.close(5)
            journal.close()

    asyncio.run(send())
    assert os.listdir(directory) == []
