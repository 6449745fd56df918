"""The impression journal: what the API answered with, on local disk until Kafka acknowledges it.

``/recommend`` answers before Kafka has its impressions (waiting costs a third of the
throughput on two cores: BENCHMARKS.md, issue 17), so an API process killed right after
answering would lose the impressions still in its producer's queue. Each request's
impressions are therefore appended to a journal segment first: one ``write`` of a
checksummed frame, a few microseconds. A write that returned is in the kernel's page
cache and survives the process being killed (not a power loss: there is no ``fsync`` per
request). A segment is deleted once it is sealed and Kafka acknowledged every frame in
it; the segments of a process that died are replayed to Kafka by the next API process
to look (``replay_orphans``), then deleted.

Ownership is an ``flock`` on each segment, held by its writer until the segment is
deleted: the kernel releases it when the process dies, whatever killed it, so a segment
whose lock can be taken is an orphan. A replayed segment may hold frames Kafka already
had (acknowledged but not yet retired when the process died); the workers drop an
impression id they already hold (``streams/attribution.py``), for the attribution window
plus ``DEDUPE_HORIZON_S`` after it was served.

Kafka's acknowledgement of a frame is appended to its segment too (an *ack frame*, written by
the delivery report's thread), so a replay sends only what Kafka had not acknowledged: a
record is sent twice only when the process died between Kafka's acknowledgement and that
write.

File format: a sequence of frames, each ``<II`` (body length, CRC-32 of the body) then the
body: ``<HI`` (topic length, record count), the topic, then per record ``<HI`` (key length,
value length), the key (UTF-8) and the value. An ack frame's body is ``<HI`` (``ACK``, the
index of the acknowledged data frame in its segment). A torn last frame (the process killed
inside the ``write``) fails its length or checksum and is dropped: a torn data frame belongs
to a request that never answered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEAD = struct.Struct("<II")  # body length, CRC-32
BATCH = struct.Struct("<HI")  # topic length, record count
RECORD = struct.Struct("<HI")  # key length, value length
SUFFIX = ".seg"
PARTIAL = ".part"

Record = tuple[str | None, bytes]
NO_KEY = 0xFFFF  # key length that spells a record without a key
ACK = 0xFFFF  # topic length that spells an ack frame


def _framed(body: bytes) -> bytes:
    return HEAD.pack(len(body), zlib.crc32(body)) + body


def encode_frame(topic: str, records: Sequence[Record]) -> bytes:
    """One frame: a batch of ``(key, value)`` records for ``topic``, checksummed."""
    t = topic.encode()
    parts = [BATCH.pack(len(t), len(records)), t]
    for key, value in records:
        k = b"" if key is None else key.encode("utf-8", "surrogatepass")
        parts += [RECORD.pack(NO_KEY if key is None else len(k), len(value)), k, value]
    return _framed(b"".join(parts))


def encode_ack(index: int) -> bytes:
    """The ack frame saying that Kafka acknowledged the segment's ``index``-th data frame (from 0)."""
    return _framed(BATCH.pack(ACK, index))


def decode_frames(data: bytes) -> tuple[list[tuple[str, list[Record]]], int]:
    """The data frames of a segment's bytes that were not acknowledged, and how many trailing bytes were torn or
    corrupt (0 when whole).

    Stops at the first frame whose length runs past the end or whose checksum fails: frames
    are appended one ``write`` at a time, so only the last can be torn.
    """
    frames: list[tuple[str, list[Record]]] = []
    acked: set[int] = set()
    pos = 0
    while pos + HEAD.size <= len(data):
        size, crc = HEAD.unpack_from(data, pos)
        body = data[pos + HEAD.size:pos + HEAD.size + size]
        if len(body) < size or zlib.crc32(body) != crc:
            break
        pos += HEAD.size + size
        tlen, n = BATCH.unpack_from(body, 0)
        if tlen == ACK:
            acked.add(n)
            continue
        at = BATCH.size
        topic = body[at:at + tlen].decode()
        at += tlen
        records: list[Record] = []
        for _ in range(n):
            klen, vlen = RECORD.unpack_from(body, at)
            at += RECORD.size
            key = None if klen == NO_KEY else body[at:at + klen].decode("utf-8", "surrogatepass")
            at += 0 if klen == NO_KEY else klen
            records.append((key, body[at:at + vlen]))
            at += vlen
        frames.append((topic, records))
    return [f for i, f in enumerate(frames) if i not in acked], len(data) - pos


@dataclass
class Segment:
    """One journal file of this process, locked by it until deleted."""

    path: Path
    fd: int
    opened: float  # time.monotonic()
    size: int = 0
    frames: int = 0  # data frames written
    outstanding: int = 0  # frames written whose acknowledgement has not come back
    kept: bool = False  # a frame Kafka refused or never took: the file stays for the next process to replay
    sealed: bool = False


@dataclass
class Token:
    """What ``Journal.append`` hands back, for ``Journal.settle`` once Kafka answered about the frame."""

    segment: Segment | None
    index: int = -1  # the frame's place among its segment's data frames


@dataclass
class JournalStats:
    """Counters the API exports (``/metrics``)."""

    written: int = 0  # frames
    write_failed: int = 0  # frames that could not be written (disk full, say): their requests are unprotected
    replayed: int = 0  # records of dead processes' segments delivered to Kafka
    segments: int = 0  # this process's segments on disk now


class Journal:
    """This process's impression journal in ``directory``.

    Parameters
    ----------
    directory : Path
        Where the segments live: a local directory, shared by the API processes of one host.
    segment_s : float
        A segment is sealed after this long (or ``segment_bytes``), and deleted once Kafka acknowledged all of
        it: it also bounds what a replay may send twice.
    segment_bytes : int
        The size at which a segment is sealed early.
    max_bytes : int
        Segments kept on disk by this process beyond which new frames are not journaled (counted in
        ``write_failed``): a Kafka outage must not fill the disk.
    """

    def __init__(self, directory: Path, segment_s: float = 0.5, segment_bytes: int = 8 << 20,
                 max_bytes: int = 1 << 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_s = segment_s
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.stats = JournalStats()
        self._lock = threading.Lock()  # append runs in the event loop, settle in librdkafka's report thread
        self._current: Segment | None = None
        self._segments: dict[Path, Segment] = {}
        self._failing = False

    # --- the writer ----------------------------------------------------------------

    def _open(self) -> Segment:
        """A new segment, created under a name the replayer ignores and renamed once locked."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial = self.directory / (name + PARTIAL)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.directory / (name + SUFFIX)
        os.rename(partial, path)
        seg = Segment(path, fd, time.monotonic())
        self._segments[path] = seg
        return seg

    def append(self, topic: str, records: Sequence[Record]) -> Token:
        """Write one frame before its records go to Kafka; the token is settled from the delivery report.

        Never raises: a frame that cannot be written (disk full, journal over ``max_bytes``) is counted and
        logged once; the records still go to Kafka, unprotected.
        """
        frame = encode_frame(topic, records)
        with self._lock:
            try:
                seg = self._current
                if seg is None or seg.size + len(frame) > self.segment_bytes or \
                        time.monotonic() - seg.opened > self.segment_s:
                    if seg is not None:
                        self._seal(seg)
                    if sum(s.size for s in self._segments.values()) + len(frame) > self.max_bytes:
                        raise OSError(f"the journal holds {self.max_bytes} bytes not yet acknowledged by Kafka")
                    seg = self._current = self._open()
                os.write(seg.fd, frame)
            except OSError as e:
                self.stats.write_failed += 1
                if not self._failing:
                    self._failing = True
                    log.warning("impression journal: cannot write to %s (%s); impressions go to Kafka unjournaled "
                                "until it can", self.directory, e)
                return Token(None)
            if self._failing:
                self._failing = False
                log.info("impression journal: writing again")
            seg.size += len(frame)
            seg.frames += 1
            seg.outstanding += 1
            self.stats.written += 1
            return Token(seg, seg.frames - 1)

    def settle(self, token: Token, delivered: bool) -> None:
        """Kafka acknowledged the frame (``delivered``) or gave it up; a done, sealed segment is deleted."""
        seg = token.segment
        if seg is None:
            return
        with self._lock:
            if seg.fd < 0:  # closed already (a report after close): the file is an orphan now, not ours
                return
            seg.outstanding -= 1
            seg.kept = seg.kept or not delivered
            if not self._retire_if_done(seg) and delivered:
                # the file stays a while (not sealed yet, or a sibling frame is missing): a replay must skip this one
                ack = encode_ack(token.index)
                try:
                    os.write(seg.fd, ack)
                    seg.size += len(ack)
                except OSError:  # disk full: a replay would send the frame again, and the workers drop it
                    pass

    def tick(self) -> None:
        """Seal the current segment once it is old enough, so an idle API deletes what Kafka has."""
        with self._lock:
            seg = self._current
            if seg is not None and time.monotonic() - seg.opened > self.segment_s:
                self._seal(seg)
            self.stats.segments = len(self._segments)

    def close(self) -> None:
        """Seal everything; segments Kafka has not fully acknowledged stay on disk for the next process."""
        with self._lock:
            for seg in list(self._segments.values()):
                seg.sealed = True
                if not self._retire_if_done(seg):
                    os.close(seg.fd)  # releases the lock: the file is an orphan now
                    seg.fd = -1
                    self._segments.pop(seg.path, None)
            self._current = None

    def _seal(self, seg: Segment) -> None:
        seg.sealed = True
        if self._current is seg:
            self._current = None
        self._retire_if_done(seg)

    def _retire_if_done(self, seg: Segment) -> bool:
        if not (seg.sealed and seg.outstanding == 0 and not seg.kept):
            return False
        # unlinked while still locked: a replayer that opened it before sees it gone (st_nlink 0) and skips it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg.path)
        os.close(seg.fd)
        seg.fd = -1
        self._segments.pop(seg.path, None)
        return True


# --- the replayer ---------------------------------------------------------------------


@dataclass
class Orphan:
    """A dead process's segment, locked by the replayer while it is replayed."""

    path: Path
    fd: int
    frames: list[tuple[str, list[Record]]]
    torn: int  # trailing bytes that were not a whole frame

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def orphans(directory: Path, partial_age_s: float = 60.0) -> Generator[Orphan, None, None]:
    """The segments in ``directory`` whose writer is gone, one at a time, each locked by this process while it is
    the current one (until the caller asks for the next, or closes the generator: ``contextlib.closing``).

    A segment still locked belongs to a live process and is skipped; so is one deleted between the
    listing and the lock. A ``.part`` file older than ``partial_age_s`` that can be locked is a process's
    segment that died before its first frame (it is empty) and is removed. One segment is in memory at a time.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.suffix not in (SUFFIX, PARTIAL):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer lives
                continue
            st = os.fstat(fd)
            if st.st_nlink == 0:  # retired by its writer while we listed
                continue
            if path.suffix == PARTIAL:
                if time.time() - st.st_mtime > partial_age_s:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            frames, torn = decode_frames(data)
            yield Orphan(path, fd, frames, torn)
        finally:
            os.close(fd)
