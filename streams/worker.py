"""The stream worker: batch agents over aiokafka, exactly-once through Redis checkpoints.

Agents (each a few lines; the work is in ``streams.attribution``,
``ranker.updates`` and ``streams.services``):

* ``attribute_and_learn`` — impressions, clicks and forwarded events of the
  partitions this worker owns: decode (bad → dead letter), forward events whose
  key another partition owns, join clicks with impressions, close windows, update
  the users' posteriors, count, archive; one Redis transaction per batch, holding
  the input offsets too. A click whose user or ad is not its impression's is
  dead-lettered (``streams.attribution.mismatch``), like a message that does not decode.
* ``index_ads`` — catalog upserts: encode (cached by text hash), store.
* timers — follow the served model, heartbeat; recreate the topics a broker restart lost.

Why not Faust: on this hardware an empty Faust agent (``take_events``) moves
~8k messages/s while a bare aiokafka ``getmany`` loop moves >200k/s; the workers
must sustain 50k events/s, so they batch at the fetch level instead.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaConnectionError, KafkaError, OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord
from redis.exceptions import RedisError

from privads.infra import keys, records
from privads.infra.errors import InvalidEvent
from privads.infra.kafka import async_producer_config, consumer_config, create_topics, keep_topics
from privads.infra.loops import Step, backoff_s, until_done
from privads.infra.migrate import refuse_old_layout
from privads.infra.objects import archive_of
from privads.infra.partitioning import owner
from privads.infra.runtime import keep_freed_memory
from privads.infra.settings import Settings
from privads.infra.store import (
    CatalogStore,
    Client,
    Cluster,
    Conflict,
    ModelPointer,
    PartitionStore,
    PartitionWrites,
    QualityBoard,
    UserStore,
    WorkerRegistry,
    connect,
    connect_sync,
    note_dead_letters,
    refuse_evicting_redis,
)
from privads.ranker.artifacts import prior_or
from privads.ranker.encoder import AdEncoder
from privads.ranker.experiment import learned_arm
from privads.ranker.quality import QualityWatch
from privads.ranker.updates import CLICK, IMPRESSION, UpdateParams, learn_events, noise_rng, sigmoid
from privads.streams import archive
from privads.streams.attribution import Clock, Seen, WallGuard, ahead, bucket_of, plan_batch
from privads.streams.services import AdVectors, CatalogIndexer

log = logging.getLogger("privads.worker")

# freshness histogram upper bounds, ms
FRESH_BOUNDS_MS = (*range(5, 100, 5), *range(100, 1000, 25), *range(1000, 5000, 250), 10_000, 60_000, 10**9)


# labelled impressions per batch fed to the online quality watch (river costs ~12 µs each)
QUALITY_SAMPLE = 256
IDLE_PER_BATCH = 1000  # idle users forgotten per partition per batch: a bounded cost, caught up over batches
# users whose idle clock this worker wrote lately (each one a ZADD per batch otherwise: ~5% of bench stream)
SEEN_CACHE = 200_000
# how long an abandoned pending bucket may outlive its event-time retention
LEAK_GUARD_S = 7 * 86400


def freshness_bucket(ms: float) -> int:
    """The smallest histogram bound ≥ ``ms`` (the last bound catches everything beyond)."""
    return FRESH_BOUNDS_MS[min(bisect.bisect_left(FRESH_BOUNDS_MS, ms), len(FRESH_BOUNDS_MS) - 1)]


@dataclass
class PartitionBatch:
    """One partition's share of a fetched batch, decoded."""

    impressions: list[records.Impression] = field(default_factory=list)
    raw_impressions: dict[str, bytes] = field(default_factory=dict)
    clicks: list[records.Click] = field(default_factory=list)
    # where each click was read, by the click object's id(): (topic, partition, offset, raw bytes), for the dead
    # letter of a click that does not match its impression and for an orphan's record of it
    click_sources: dict[int, tuple[str, int, int, bytes]] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)  # topic → next offset
    fingerprints: dict[str, int] = field(default_factory=dict)  # topic → timestamp of the last record
    event_ts: dict[str, list[float]] = field(default_factory=dict)  # input topic → event times it delivered
    processed: Counter[str] = field(default_factory=Counter)


class EventAgent:
    """Attribution and user learning for the partitions this worker owns."""

    def __init__(self, settings: Settings, redis: Client, producer: AIOKafkaProducer,
                 ad_vectors: AdVectors) -> None:
        self.s = settings
        self.store = PartitionStore(redis)
        self.redis = redis
        self.users = UserStore(redis, settings.partitions)
        # on a cluster: per partition, the newest archive / outbox entry a replica is known to hold (``Committed``),
        # up to which the archive drains and the outbox folds
        self.durable_archive: dict[int, str] = {}
        self.unfolded: dict[int, str] = {}
        # user → when this worker last committed its idle clock (seen:{p}); written again only after ``seen_every``,
        # so an idle user expires between USER_IDLE_S and USER_IDLE_S + seen_every after its last event
        self.seen_at: OrderedDict[str, float] = OrderedDict()
        self.seen_every = settings.user_idle_s / 30
        self.producer = producer
        self.ad_vectors = ad_vectors
        self.window_s = settings.attribution_window_s
        self.bucket_s = max(1, int(settings.attribution_window_s // 30))
        self.retention_s = settings.attribution_window_s + settings.dedupe_horizon_s
        self.params = UpdateParams.from_settings(settings)
        self.prior_mean = np.zeros(settings.d_user, dtype=np.float32)
        self.rng = noise_rng(settings.dp_clip is not None, settings.seed)
        self.quality = QualityWatch()
        self.new_drifts = 0
        self.consumer: AIOKafkaConsumer | None = None
        self.owned: set[int] = set()
        self.to_seek: set[int] = set()
        self.n_partitions = settings.partitions
        self.wall_guard = WallGuard()

    # --- ownership ------------------------------------------------------------------

    async def seek_to_checkpoints(self, partitions: set[int]) -> None:
        """Resume each owned partition where its last committed batch ended (Redis, not Kafka, is the truth).

        A topic is read from its start only on evidence that its log is not the one the checkpoint was taken on
        (``_same_log``); when the broker cannot tell now, the seek raises and is tried again.
        """
        assert self.consumer is not None
        if not partitions:
            return
        ckpts, _ = await self.store.checkpoints(sorted(partitions))
        for p in partitions:
            reset = []
            for topic in records.EVENT_TOPICS:
                tp = TopicPartition(topic, p)
                stored = ckpts[p].offsets.get(topic)
                if stored and await self._same_log(tp, stored - 1, ckpts[p].fingerprints.get(topic)):
                    self.consumer.seek(tp, stored)
                else:
                    # never consumed, or a different log than the checkpoint's (the broker lost it)
                    await self.consumer.seek_to_beginning(tp)
                    if stored:
                        reset.append(topic)
            if reset:
                log.warning("partition %d: %s is a new log (broker restarted?); reading it from the start", p, reset)
                await self.store.reset_offsets(p, reset)

    async def _same_log(self, tp: TopicPartition, offset: int, fingerprint: int | None) -> bool:
        """Whether the record at ``offset`` is the one the checkpoint last consumed.

        End offsets cannot tell: tansu under-reports them. Evidence of a new log is a
        different record at ``offset`` (another timestamp) or no record there at all
        (the log ends before it: offset out of range, or an empty fetch while the
        partition's end offset is at or below ``offset``). Anything else — a Kafka error,
        a slow fetch — proves nothing, and raises ``KafkaConnectionError`` so the caller
        retries instead of replaying a log it has applied.
        """
        if fingerprint is None:
            return False
        # one record is read: the clients' default fetch sizes, not the workers' large ones
        probe = AIOKafkaConsumer(**consumer_config(self.s.kafka_servers, auto_offset_reset="none",
                                                   fetch_max_wait_ms=100, fetch_max_bytes=52_428_800,
                                                   max_partition_fetch_bytes=1_048_576))
        await probe.start()
        try:
            probe.assign([tp])
            probe.seek(tp, offset)
            try:
                got = await probe.getmany(tp, timeout_ms=5000, max_records=1)
            except OffsetOutOfRangeError:
                return False  # the log is shorter than the checkpoint: a new one
            recs = got.get(tp, [])
            if recs:
                return recs[0].offset == offset and recs[0].timestamp == fingerprint
            end = (await probe.end_offsets([tp]))[tp]
            if end <= offset:
                return False  # nothing there: the log ends before the record the checkpoint consumed
            raise KafkaConnectionError(f"{tp.topic}[{tp.partition}]: no record at offset {offset} within 5 s although "
                                       f"the log reaches {end}; cannot tell whether it is the checkpoint's log")
        finally:
            await probe.stop()

    # --- one batch ----------------------------------------------------------------------

    async def step(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], tick: bool) -> None:
        """Apply one fetched batch exactly once: decode, plan, commit with the offsets; re-plan on a conflict.

        Each attempt first drops the records its partition's checkpoint has passed (a fetch that raced a seek, or
        another worker that applied them during a rebalance), so a re-plan never applies a record twice; side
        outputs (forwards, dead letters) go out once per record across attempts. Conflicts (an erasure or another
        writer moved ``seq``) are retried with jittered backoff for as long as they last: a worker never gives up
        a batch.
        """
        lettered: set[tuple[str, int, int, str]] = set()  # rejected clicks dead-lettered by an earlier attempt
        sent: set[tuple[str, int, int]] = set()  # records whose forward or dead letter went out already
        attempt = 0
        while True:
            by_p, side = await self._decode(batch, tick)
            if not by_p:
                return
            todo = [(src, out) for src, out in side if src not in sent]
            if todo:
                await asyncio.gather(*[await self.producer.send(t, value=v, key=k, partition=p, headers=h)
                                       for _, (t, p, k, v, h) in todo])
                sent.update(src for src, _ in todo)
                await noted(self.redis, [v for _, (t, _, _, v, _) in todo if t == records.DEAD_LETTER])
            try:
                await self._apply(by_p, lettered)
                break
            except Conflict as e:
                if attempt == 0:
                    log.info("batch conflict (%s); re-planning with backoff", e)
                elif attempt % 50 == 0:
                    log.warning("batch still conflicting after %d attempts (%s); retrying", attempt, e)
                lost = await self._lost_partitions(by_p)
                batch = {tp: msgs for tp, msgs in batch.items() if tp.partition not in lost}
                self.to_seek |= lost & self.owned
                await asyncio.sleep(backoff_s(attempt))
                attempt += 1
        assert self.consumer is not None
        commits = {TopicPartition(t, p): o for p, pb in by_p.items() for t, o in pb.offsets.items()}
        if commits:
            try:
                await self.consumer.commit(commits)  # for lag monitoring only: Redis holds the truth
            except Exception as e:  # noqa: BLE001 - a rebalance may have moved the partition
                log.debug("offset commit skipped: %s", e)

    async def _decode(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], tick: bool
                      ) -> tuple[dict[int, PartitionBatch], list[tuple[tuple[str, int, int], tuple]]]:
        """The batch's records past their partition's checkpoint, decoded per partition, and the side outputs.

        Side outputs are ((topic, partition, offset) read, (topic, partition, key, value, headers) to produce).
        """
        by_p: dict[int, PartitionBatch] = {}
        side: list[tuple[tuple[str, int, int], tuple]] = []
        wall = time.time()
        if batch:
            # a record below its partition's checkpoint was applied already: drop it
            done, _ = await self.store.checkpoints(sorted({tp.partition for tp in batch}))
            batch = {tp: [m for m in msgs if m.offset >= done[tp.partition].offsets.get(tp.topic, 0)]
                     for tp, msgs in batch.items()}
            batch = {tp: msgs for tp, msgs in batch.items() if msgs}
        for tp, msgs in batch.items():
            pb = by_p.setdefault(tp.partition, PartitionBatch())
            pb.offsets[tp.topic] = msgs[-1].offset + 1
            pb.fingerprints[tp.topic] = msgs[-1].timestamp
            for m in msgs:
                out: list[tuple] = []
                self._route(tp, m, pb, out, wall)
                side.extend(((tp.topic, tp.partition, m.offset), o) for o in out)
        if tick:
            for p in self.owned:
                by_p.setdefault(p, PartitionBatch())
        return by_p, side

    def _route(self, tp: TopicPartition, m: ConsumerRecord[bytes, bytes], pb: PartitionBatch, side: list,
               wall: float) -> None:
        """Decode one message into its partition batch, or into a side output (dead letter, forward)."""
        topic = tp.topic
        if topic == records.REPARTITION:
            topic = dict(m.headers or ()).get(records.ORIGIN_HEADER, b"").decode() or records.IMPRESSIONS
        pb.processed[topic] += 1
        try:
            rec = records.decode_record(topic, m.value)
            if (why := ahead(rec.ts, wall, self.s.max_event_ahead_s)) is not None:
                raise InvalidEvent(why)
        except InvalidEvent as e:
            side.append((records.DEAD_LETTER, None, None,
                         records.dead_letter(tp.topic, tp.partition, m.offset, str(e), m.value), []))
            pb.processed["dead_letters"] += 1
            return
        key = rec.user_id.encode()
        home = owner(key, self.n_partitions)
        if home != tp.partition and tp.topic != records.REPARTITION:
            side.append((records.REPARTITION, home, key, m.value, [(records.ORIGIN_HEADER, topic.encode())]))
            pb.processed["forwarded"] += 1
            return
        pb.event_ts.setdefault(tp.topic, []).append(rec.ts)
        if topic == records.IMPRESSIONS:
            pb.impressions.append(rec)
            pb.raw_impressions[rec.event_id] = m.value
        else:
            pb.clicks.append(rec)
            pb.click_sources[id(rec)] = (tp.topic, tp.partition, m.offset, m.value)

    async def _behind(self, p: int, topics: Sequence[str]) -> list[str]:
        """The topics of partition ``p`` this worker has not read to their end (position below the high watermark,
        or not fetched since it was assigned the partition): they are not idle, whatever their marks say."""
        consumer = self.consumer
        if consumer is None:
            return []
        assigned = consumer.assignment()
        behind = []
        for topic in topics:
            tp = TopicPartition(topic, p)
            if tp in assigned and ((left := await unread(consumer, tp)) is None or left > 0):
                behind.append(topic)
        return behind

    async def _lost_partitions(self, by_p: dict[int, PartitionBatch]) -> set[int]:
        """Partitions of this batch another worker owns now: not assigned here any more, or their checkpoint moved
        to or past where this batch ends (what remains of it, if anything, the next attempt re-filters)."""
        ckpts, _ = await self.store.checkpoints(sorted(by_p))
        lost = set()
        for p, pb in by_p.items():
            if p not in self.owned:
                lost.add(p)
                continue
            for topic, nxt in pb.offsets.items():
                stored = ckpts[p].offsets.get(topic)
                if stored is not None and stored >= nxt:
                    lost.add(p)
        return lost

    @staticmethod
    def _source(pb: PartitionBatch, partition: int, click: records.Click) -> tuple[str, int, int, bytes]:
        """Where ``click`` was read: this batch's message, or what its orphan record kept of it.

        An orphan stored before orphans kept their source gets its partition's ``privads.clicks``, offset -1
        and its contract fields re-encoded.
        """
        src = pb.click_sources.get(id(click))
        if src is not None:
            return src
        if isinstance(click, records.Orphan) and click.src_topic is not None:
            payload = click.src_payload if click.src_payload is not None else records.encode(records.click_only(click))
            return click.src_topic, int(click.src_partition or 0), int(click.src_offset or 0), payload
        return records.CLICKS, partition, -1, records.encode(records.click_only(click))

    def _orphan(self, pb: PartitionBatch, partition: int, click: records.Click) -> bytes:
        """A click to wait for its impression, packed with where it was read."""
        return records.pack_click(records.orphan(click, *self._source(pb, partition, click)))

    async def _dead_letter_rejected(self, by_p: dict[int, PartitionBatch], plans: dict,
                                    lettered: set[tuple[str, int, int, str]]) -> None:
        """Produce the dead letters of the clicks the plans rejected, before the batch commits.

        At least once, like those of messages that do not decode: a batch replayed after a crash letters
        them again; a re-plan after a ``Conflict`` does not (``lettered``).
        """
        letters = []
        for p, plan in plans.items():
            for click, why in plan.rejected:
                topic, partition, offset, payload = self._source(by_p[p], p, click)
                key = (topic, partition, offset, click.event_id)
                if key not in lettered:
                    letters.append((key, records.dead_letter(topic, partition, offset, why, payload)))
        if letters:
            await asyncio.gather(*[await self.producer.send(records.DEAD_LETTER, value=v) for _, v in letters])
            lettered.update(k for k, _ in letters)
            await noted(self.redis, [v for _, v in letters])

    async def _apply(self, by_p: dict[int, PartitionBatch], lettered: set[tuple[str, int, int, str]]) -> None:
        wall = time.time()
        # the partition clocks run on a wall time that a forward step cannot jump (streams.attribution.WallGuard),
        # and hold no watermark past it
        guarded = self.wall_guard.read(wall, time.monotonic())
        parts = sorted(by_p)
        ckpts, bucket_sets = await self.store.checkpoints(parts)
        plans, writes, seq = {}, [], {}
        reads: list[tuple[str, tuple]] = []
        layout = []
        for p in parts:
            pb, ck, bkts = by_p[p], ckpts[p], bucket_sets[p]
            seq[p] = ck.seq
            clock = Clock(ck.marks).bounded(guarded).advance(pb.event_ts, guarded)
            if idle_topics := clock.idle(guarded):  # idle only once read to its end: a backlog is not quiet
                clock = clock.touch(await self._behind(p, idle_topics), guarded)
            now = clock.now(guarded)
            cutoff = bucket_of(now - self.window_s, self.bucket_s)
            closed = ck.closed_before if ck.closed_before is not None else cutoff
            due = sorted(b for b in bkts if closed <= b < cutoff)
            start = len(reads)
            imp_by_bucket: dict[int, list[str]] = defaultdict(list)
            for imp in pb.impressions:
                b = bucket_of(imp.ts, self.bucket_s)
                if b in bkts:
                    imp_by_bucket[b].append(imp.event_id)
            click_ids = list(dict.fromkeys(c.impression_id for c in pb.clicks))
            for b, ids in imp_by_bucket.items():
                reads.append(("hmget", (keys.pending(p, b), ids)))
            if click_ids:
                for b in bkts:
                    reads.append(("hmget", (keys.pending(p, b), click_ids)))
            lookup = list(dict.fromkeys([i.event_id for i in pb.impressions] + click_ids))
            if lookup:
                reads.append(("hmget", (keys.orphans(p), lookup)))
            for b in due:
                reads.append(("hgetall", (keys.pending(p, b),)))
            sweep = cutoff > closed  # the close cursor moves: time to expire old orphans too
            if sweep:
                reads.append(("hgetall", (keys.orphans(p),)))
            # users idle for USER_IDLE_S (wall time: an event-time clock would stop with the traffic), a bounded few
            reads.append(("zrangebyscore", (keys.seen(p), "-inf", wall - self.s.user_idle_s, 0, IDLE_PER_BATCH)))
            layout.append((p, clock, now, closed, due, sweep, start, imp_by_bucket, click_ids, lookup, bkts))
        results = await self.store.read(reads) if reads else []
        idle: dict[int, list[str]] = {}
        for p, clock, now, closed, due, sweep, start, imp_by_bucket, click_ids, lookup, bkts in layout:
            pb = by_p[p]
            seen = Seen(closed_before=closed)
            i = start
            for b, ids in imp_by_bucket.items():
                for iid, blob in zip(ids, results[i], strict=True):
                    if blob is not None:
                        seen.pending[iid] = (b, records.unpack_pending(blob))
                i += 1
            if click_ids:
                for b in bkts:
                    for iid, blob in zip(click_ids, results[i], strict=True):
                        if blob is not None:
                            seen.pending[iid] = (b, records.unpack_pending(blob))
                    i += 1
            if lookup:
                for iid, blob in zip(lookup, results[i], strict=True):
                    if blob is not None:
                        seen.orphans[iid] = records.unpack_click(blob)
                i += 1
            for b in due:
                seen.due[b] = {k.decode(): records.unpack_pending(v) for k, v in results[i].items()}
                i += 1
            if sweep:
                seen.all_orphans = {k.decode(): records.unpack_click(v) for k, v in results[i].items()}
                i += 1
            idle[p] = [u.decode() for u in results[i]]
            plan = plan_batch(pb.impressions, pb.clicks, seen, now=now, window_s=self.window_s,
                              bucket_s=self.bucket_s, arm_bucket_s=keys.ARM_BUCKET_S,
                              base_rate=self.s.base_rate)
            plans[p] = plan
            horizon = bucket_of(now - self.retention_s, self.bucket_s)
            w = PartitionWrites(
                partition=p, offsets=pb.offsets, fingerprints=pb.fingerprints, closed_before=plan.closed_before,
                marks=clock.marks,
                pending={b: {iid: records.pack_pending(r) for iid, r in recs.items()}
                         for b, recs in plan.put_pending.items()},
                # buckets are dropped explicitly, on event time; the TTL only guards against leaks
                pending_ttl_s=int(self.retention_s + LEAK_GUARD_S),
                put_orphans={iid: self._orphan(pb, p, c) for iid, c in plan.put_orphans.items()},
                del_orphans=plan.del_orphans,
                drop_buckets={b for b in bkts if b < horizon},
            )
            writes.append(w)
        served = [imp for plan in plans.values() for imp in plan.new_impressions]
        labels = [ex for plan in plans.values() for ex in plan.labelled]
        (users, learned, most, scored, population, homes, erased), held = await asyncio.gather(
            self._learn(served, labels), self.users.populations(parts))
        # idle users are forgotten in this batch's transaction: their keys, and their means out of the population sum
        expire = {p: [u for u in us if u not in users] for p, us in idle.items()}
        candidates = [u for us in expire.values() for u in us]
        states = dict(zip(candidates, await self.users.get_many(candidates), strict=True)) if candidates else {}
        d = self.s.d_user
        for w in writes:
            w.expired = expire.get(w.partition, [])
            gone = [st[0] for u in w.expired if (st := states.get(u)) is not None and st[0].shape == (d,)]
            if w.partition not in population and not gone:
                continue
            # fenced like the rest: only this partition's owner (or an erasure, bumping seq) writes it
            total, users_in = held.get(w.partition, (np.zeros(d), 0))
            if total.shape != (d,):  # another user dimension: a new sum
                total, users_in = np.zeros(d), 0
            change, new = population.get(w.partition, (np.zeros(d), 0))
            lost = np.sum(gone, axis=0, dtype=np.float64) if gone else np.zeros(d)
            w.population = keys.pack_population(total + change - lost, max(users_in + new - len(gone), 0))
        by_partition = {w.partition: w for w in writes}
        for w in writes:  # the archive's entry: no row of a user erased before this batch (tombstones read in _learn)
            plan, pb = plans[w.partition], by_p[w.partition]
            if plan.new_impressions or plan.click_ts:
                imps = [i for i in plan.new_impressions if not records.erased_event(erased, i.user_id, i.ts)]
                labs = [ex for ex in plan.labelled
                        if ex.clicked and not records.erased_event(erased, ex.user_id, ex.ts)]
                if imps or labs:
                    w.archive = {b"imp": b"\n".join(pb.raw_impressions[i.event_id] for i in imps),
                                 b"lab": msgspec.msgpack.encode(labs)}
        for u, h in homes.items():  # when each written user last changed: the clock of its idle expiry
            if (home := by_partition.get(h)) is not None:
                home.touched[u] = wall
        for u, blob in users.items():  # each user's state commits with its partition
            by_partition[owner(u.encode(), self.n_partitions)].users[u] = blob
        counters = self._counters(by_p, plans, learned, wall)
        for w in writes:
            w.counters = counters.get(w.partition, {})
            w.arms = {policy for (policy, _, _) in plans[w.partition].arm}
        await self._dead_letter_rejected(by_p, plans, lettered)
        committed = await self.store.commit(seq, writes, most)
        if committed is not None:
            self.durable_archive.update(committed.archive)
            self.unfolded.update(committed.outbox)
            await self.fold()
        for w in writes:  # committed: these clocks are in Redis
            for u, t in w.touched.items():
                self.seen_at[u] = t
                self.seen_at.move_to_end(u)
        while len(self.seen_at) > SEEN_CACHE:
            self.seen_at.popitem(last=False)
        # only a committed batch counts: an apply that hit a conflict is planned (and scored) again
        self.new_drifts += self.quality.update(*scored)

    async def _learn(
        self, served: list[records.Impression], labelled: list[records.Labelled]
    ) -> tuple[dict[str, bytes], Counter[tuple[int, str]], int, tuple[np.ndarray, np.ndarray],
               dict[int, tuple[np.ndarray, int]], dict[str, int], dict[str, float]]:
        """New packed posteriors of the users these events touch, a sample of (outcome, prediction) pairs, and
        what the population sums of their partitions gain (partition → (Σ change of the means, new users)), the
        partition of each written user whose idle clock is due, and the erased users among the events' (→ when).

        Fast negatives (``ranker.updates.learn_events``): every impression served
        takes its label-free half of the logistic step now, and a click takes the
        rest when it is joined; a window closing on a non-click changes no user.
        An impression's logit is offset by the log of the calibration factor it
        was served with (``Impression.factor``), as serving multiplies it in.
        """
        out: Counter[tuple[int, str]] = Counter()  # (partition, stat) → n
        none = (np.zeros(0), np.zeros(0))
        # consumption order: first the clicks on impressions of earlier batches (a click's half is the same step
        # whenever it is taken), then each new impression's half, followed at once by its click's if it joined in
        # this batch, as they came in when served (a replayed log brings many of a user's impressions at once)
        clicked = {ex.impression_id: ex for ex in labelled if ex.clicked}
        new_ids = {imp.event_id for imp in served}
        # (user, ad, ts, kind, factor served, expected clicks for the user's tastes, whether the tastes count it):
        # an impression expects pctr · factor / user_factor, its click's probability under the population-level
        # factor; only a learned arm's events count, as only those log what was expected of them
        def tasted(policy: str) -> bool:
            return learned_arm(policy, self.s.control_policy)

        events = [(ex.user_id, ex.ad_id, ex.ts, CLICK, 1.0, 0.0, tasted(ex.policy))
                  for iid, ex in clicked.items() if iid not in new_ids]
        for imp in served:
            events.append((imp.user_id, imp.ad_id, imp.ts, IMPRESSION, imp.factor or 1.0,
                           (imp.pctr or 0.0) * (imp.factor or 1.0) / (imp.user_factor or 1.0), tasted(imp.policy)))
            if (ex := clicked.get(imp.event_id)) is not None:
                events.append((ex.user_id, ex.ad_id, ex.ts, CLICK, 1.0, 0.0, tasted(ex.policy)))
        if not events and not labelled:
            return {}, out, 0, none, {}, {}, {}
        # the labels only feed the quality watch: a bounded, deterministic sample of them is read
        probes = [labelled[i] for i in np.linspace(0, len(labelled) - 1, min(len(labelled), QUALITY_SAMPLE))
                  .astype(np.int64).tolist()] if labelled else []
        user_ids = list(dict.fromkeys([e[0] for e in events] + [ex.user_id for ex in probes]))
        states, erased, vectors = await asyncio.gather(
            self.users.get_many_with_tastes(user_ids), self.users.erased_at(user_ids),
            self.ad_vectors.get(list(dict.fromkeys([e[1] for e in events] + [ex.ad_id for ex in probes]))))
        row = {u: i for i, u in enumerate(user_ids)}
        # each user's partition, once per user: stats are counted per partition (each commits on its own on a cluster)
        home = np.array([owner(u.encode(), self.n_partitions) for u in user_ids], dtype=np.int64)
        gone = {u: t for u, t in zip(user_ids, erased, strict=True) if t is not None}

        def unusable(user_id: str, ad_id: str, ts: float) -> str | None:
            """Why an event cannot be learned (its ad has no vector, its user was erased after it), else None."""
            if ad_id not in vectors:
                return "skipped_unknown_ad"
            if records.erased_event(gone, user_id, ts):
                return "skipped_erased"
            return None

        keep = []
        for e in events:
            if (why := unusable(*e[:3])) is None:
                keep.append(e)
            else:
                out[(int(home[row[e[0]]]), why)] += 1
        scored = [ex for ex in probes if unusable(ex.user_id, ex.ad_id, ex.ts) is None]
        d = self.s.d_user
        mean = np.tile(self.prior_mean, (len(user_ids), 1))
        precision = np.full((len(user_ids), d), self.s.prior_precision, dtype=np.float32)
        counts = np.zeros(len(user_ids), dtype=np.int64)
        known = np.zeros(len(user_ids), bool)
        tastes = [keys.no_tastes()] * len(user_ids)
        for i, full in enumerate(states):
            if full is not None and full[0][0].shape[0] == d:
                mean[i], precision[i], counts[i] = full[0]
                tastes[i] = full[1]
                known[i] = True
        before = mean.astype(np.float64)
        sample = none
        if scored:
            # prequential: score each label with the state before this batch (its impression's half is label-free)
            ex_rows = np.array([row[ex.user_id] for ex in scored])
            ex_ads = np.stack([vectors[ex.ad_id] for ex in scored])
            predicted = sigmoid(np.einsum("ij,ij->i", mean[ex_rows], ex_ads) + self.params.bias)
            sample = (np.array([ex.clicked for ex in scored], dtype=np.float64), predicted)
        if not keep:
            return {}, out, 0, sample, {}, {}, gone
        idx = np.array([row[e[0]] for e in keep])
        ads = np.stack([vectors[e[1]] for e in keep])
        kinds = np.array([e[3] for e in keep])
        # the ad's calibration factor that serving multiplied in (logged with the impression; 1 if not logged):
        # users learn what is theirs only, and the step depends on the event alone, not on when it is applied
        offset = np.log(np.array([e[4] for e in keep], np.float64))
        mean, precision = learn_events(mean, precision, idx, ads, kinds, self.prior_mean, self.params, self.rng,
                                       offset=offset)
        counts += np.bincount(idx[kinds == IMPRESSION], minlength=len(user_ids))
        touched = np.unique(idx)
        # each user's tastes (``scoring.user_factors``): clicks and expected clicks per category of the ads;
        # none under differential privacy (``Settings.tastes``)
        if self.s.tastes > 0:
            shown = (kinds == IMPRESSION).astype(np.float64)
            hashes = np.where([e[6] for e in keep], self.ad_vectors.category_hashes([e[1] for e in keep]), 0)
            tastes = keys.merge_tastes_many(tastes, idx, hashes, 1.0 - shown,  # hash 0: not counted
                                            np.array([e[5] for e in keep], np.float64), shown,
                                            window=self.s.taste_window)
        # counted per partition: on a cluster each partition commits (and counts) on its own
        event_home = home[idx]
        for h in np.unique(event_home).tolist():
            mine = kinds[event_home == h]
            out[(h, "learned_impressions")] += int((mine == IMPRESSION).sum())
            out[(h, "learned_clicks")] += int((mine == CLICK).sum())
        packed = {user_ids[i]: keys.pack_user(mean[i], precision[i], int(counts[i]), tastes[i]) for i in touched}
        # what each partition's population sum gains: the touched users' moves, and the new users whole
        homes = home[touched]
        change = mean[touched].astype(np.float64) - np.where(known[touched, None], before[touched], 0.0)
        population = {int(h): (change[homes == h].sum(axis=0), int((~known[touched])[homes == h].sum()))
                      for h in np.unique(homes)}
        # each impression is at most two steps (its half and its click's): the DP accounting's bound
        # the partition of each written user whose idle clock is due (new here, or not written for seen_every):
        # for seen:{p}; a new user always, since an erasure may have cleared the entry this worker remembers
        wall = time.time()
        home_of = {user_ids[i]: h for i, h in zip(touched.tolist(), homes.tolist(), strict=True)
                   if not known[i] or wall - self.seen_at.get(user_ids[i], -np.inf) >= self.seen_every}
        return packed, out, 2 * int(counts[touched].max()), sample, population, home_of, gone

    async def fold(self) -> None:
        """On a cluster: fold the outboxes of the partitions committed since into the global counters."""
        for p, upto in sorted(self.unfolded.items()):
            await self.store.fold(p, upto)
            if self.unfolded.get(p) == upto:
                del self.unfolded[p]

    def _counters(self, by_p: dict[int, PartitionBatch], plans: dict, learned: Counter[tuple[int, str]],
                  wall: float) -> dict[int, dict[str, dict[str, float]]]:
        """The global counters' increments of the batch, per partition: hash key → field → increment."""
        out: dict[int, dict[str, dict[str, float]]] = {}
        for p, pb in by_p.items():
            counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(int))
            out[p] = counters
            stats = counters[keys.STATS]
            for topic, n in pb.processed.items():
                stats[f"processed:{topic}" if topic.startswith("privads.") else topic] += n
            plan = plans[p]
            for k, n in plan.stats.items():
                stats[k] += n
            for (policy, b, what), n in plan.arm.items():  # b: the minute; rolled up per hour and day as well
                for key in keys.arm_rollup(policy, b):
                    counters[key][what] += n
            for (policy, b, what), v in plan.arm_value.items():  # floats: HINCRBYFLOAT (infra.store._write_global)
                for key in keys.arm_rollup(policy, b):
                    counters[key][what] += v
            for (policy, ad_id, what), n in plan.ads.items():
                counters[keys.adstat(policy, what)][ad_id] += n
            stats["labelled_clicks"] += sum(ex.clicked for ex in plan.labelled)
            stats["labelled_negatives"] += sum(not ex.clicked for ex in plan.labelled)
            for ts in plan.click_ts:
                counters[keys.FRESHNESS][str(freshness_bucket((wall - ts) * 1000))] += 1
        for (p, k), n in learned.items():  # a user's events arrive on its own partition (``_decode`` forwards)
            out.setdefault(p, defaultdict(lambda: defaultdict(int)))[keys.STATS][k] += n
        return out


class Listener(ConsumerRebalanceListener):
    def __init__(self, agent: EventAgent) -> None:
        self.agent = agent

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.agent.owned -= {tp.partition for tp in revoked}

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # the seek happens in the agent's own loop, between batches: a seek from here races fetches in flight
        parts = {tp.partition for tp in assigned}
        self.agent.owned = parts
        self.agent.to_seek |= parts
        log.info("owning partitions %s", sorted(parts))


async def unread(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """Records of an assigned partition this consumer has not taken yet (high watermark − position); None when
    that is not known: not fetched since it was assigned, or being reset or reassigned."""
    high = consumer.highwater(tp)  # from the last fetch response; None before the first
    if high is None:
        return None
    try:
        position = await asyncio.wait_for(consumer.position(tp), 1.0)
    except (KafkaError, TimeoutError, AssertionError):
        return None
    return max(0, high - position)


async def consumer_lag(consumer: AIOKafkaConsumer) -> dict[str, int]:
    """Records of the assigned partitions not yet taken by this worker, per topic (unknown ones: next beat)."""
    lag = {t: 0 for t in records.CONSUMED_TOPICS}
    for tp in consumer.assignment():
        if (left := await unread(consumer, tp)) is not None:
            lag[tp.topic] = lag.get(tp.topic, 0) + left
    return lag


async def index_ads(settings: Settings, indexer: CatalogIndexer, producer: AIOKafkaProducer,
                    stop: asyncio.Event) -> None:
    """Catalog upserts → text embeddings (cached) → Redis; at least once, idempotent."""
    consumer = AIOKafkaConsumer(records.ADS, group_id=f"{settings.worker_group}-catalog",
                                **consumer_config(settings.kafka_servers))
    await consumer.start()
    try:
        fetch = Step("fetching catalog upserts", log, base_s=0.2, max_s=5.0)
        upsert = Step("storing a catalog batch", log, base_s=0.2, max_s=5.0)
        commit = Step("committing the catalog offsets", log, base_s=0.2, max_s=5.0)
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}

        async def get() -> None:
            fetched.clear()
            fetched.update(await consumer.getmany(timeout_ms=200, max_records=512))

        while not stop.is_set():
            if not await until_done(fetch, get, stop):
                break
            batch = dict(fetched)
            good, letters = [], []
            sources: dict[int, tuple[str, int, int, bytes]] = {}
            for tp, msgs in batch.items():
                for m in msgs:
                    try:
                        good.append(ad := records.decode_record(records.ADS, m.value))
                        sources[id(ad)] = (tp.topic, tp.partition, m.offset, m.value)
                    except InvalidEvent as e:
                        letters.append(records.dead_letter(tp.topic, tp.partition, m.offset, str(e), m.value))
            # the batch is retried until it is stored (a Redis or broker blip), then committed: never skipped
            await until_done(upsert, functools.partial(_index_batch, indexer, producer, good, letters, sources), stop)
            if batch:
                await until_done(commit, consumer.commit, stop)
    finally:
        await consumer.stop()


async def _index_batch(indexer: CatalogIndexer, producer: AIOKafkaProducer, good: list[records.Ad],
                       letters: list[bytes], sources: dict[int, tuple[str, int, int, bytes]]) -> None:
    """Store a batch of ads; an ad that fails for a reason of its own (not Redis, not the broker) is dead-lettered."""
    letters = list(letters)
    if good:
        try:
            await indexer.upsert(good)
        except TRANSIENT:
            raise
        except Exception:  # noqa: BLE001 - one bad ad must not stop the catalog: find it, letter it, keep the rest
            log.exception("a catalog batch failed; storing its ads one by one")
            for ad in good:
                try:
                    await indexer.upsert([ad])
                except TRANSIENT:
                    raise
                except Exception as e:  # noqa: BLE001 - see above
                    topic, partition, offset, raw = sources[id(ad)]
                    letters.append(records.dead_letter(topic, partition, offset,
                                                       f"ad {ad.ad_id!r} could not be indexed: {type(e).__name__}: {e}",
                                                       raw))
    if letters:
        await asyncio.gather(*[await producer.send(records.DEAD_LETTER, v) for v in letters])
        await noted(indexer.catalog.r, letters)


async def noted(r: Client, letters: list[bytes]) -> None:
    """The dead letters' reasons for the dashboard (``infra.store.note_dead_letters``): best effort, after they
    went to the dead-letter topic; a failure here is logged and loses nothing (the topic has them)."""
    try:
        await note_dead_letters(r, letters)
    except Exception as e:  # noqa: BLE001 - observability only
        log.debug("could not note %d dead letters' reasons: %s", len(letters), e)


# transient failures a loop step rides out: Redis or the broker away, a socket closing
TRANSIENT = (RedisError, KafkaError, OSError, TimeoutError)


async def run(settings: Settings) -> None:
    """The worker: event agent, catalog agent and timers, until SIGTERM/SIGINT."""
    keep_freed_memory()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.to_thread(create_topics, settings.kafka_servers, settings.partitions)
    r = connect(settings.redis_url)
    await refuse_evicting_redis(r)  # an evicting Redis would drop checkpoints silently (README: Resource limits)
    await refuse_old_layout(r)  # state of an earlier key layout would look like none (README: On a Redis Cluster)
    catalog = CatalogStore(r)
    ad_vectors = AdVectors(settings, catalog, ModelPointer(r))
    indexer = CatalogIndexer(catalog, AdEncoder(settings.encoder_backend, settings.models_dir / "encoder"))
    producer = AIOKafkaProducer(**async_producer_config(settings.kafka_servers))
    await producer.start()
    agent = EventAgent(settings, r, producer, ad_vectors)
    await agent.store.set_partitions(settings.partitions)
    consumer = AIOKafkaConsumer(group_id=settings.worker_group, partition_assignment_strategy=(RangePartitionAssignor,),
                                **consumer_config(settings.kafka_servers))
    agent.consumer = consumer
    consumer.subscribe(list(records.EVENT_TOPICS), listener=Listener(agent))
    await consumer.start()
    registry = WorkerRegistry(r)
    quality_board = QualityBoard(r)
    worker_id = f"{socket.gethostname()}-{os.getpid()}"

    archive_redis = connect_sync(settings.redis_url)
    drainer = archive.Drainer(archive_of(settings), settings.archive_every_s, worker_id)

    def archive_partitions(parts: list[int], force: bool = False) -> None:
        """Drain the committed archive entries of these partitions into Parquet (in a thread; a failure is logged
        once and retried with a back-off, ``streams.archive.Drainer``)."""
        # on a cluster, only what a replica holds (a failover would replay the rest: drained, it would count twice)
        drainer.run(archive_redis, parts, force, dict(agent.durable_archive) if isinstance(r, Cluster) else None)

    async def timers() -> None:
        """Follow the served model, heartbeat, publish the quality watch, archive: each step on its own.

        One step failing (a model version that cannot be read, Redis away) is logged
        once and retried with backoff (``infra.loops.Step``) and never skips the
        others: the heartbeat goes on and ``arch:{p}`` keeps draining.
        """
        model = Step("following the served model", log, max_s=10.0)
        heartbeat = Step("heartbeat", log, max_s=2.0)  # the API counts a worker alive for 5 s after its last beat
        quality = Step("publishing the quality watch", log, max_s=10.0)
        drain = Step("draining the archive", log, max_s=30.0)
        last_archive = time.monotonic()

        async def follow_model() -> None:
            await ad_vectors.refresh()
            agent.prior_mean = prior_or(ad_vectors.prior, agent.prior_mean)  # new users start from the version's

        async def beat() -> None:
            await registry.beat(worker_id, len(agent.owned), time.time(), await consumer_lag(consumer))

        async def publish_quality() -> None:
            drifts = agent.new_drifts
            await quality_board.publish(worker_id, asdict(agent.quality.snapshot()), time.time(), drifts > 0)
            agent.new_drifts -= drifts  # only once published, and only those: no drift is lost to a failed write

        async def archive_owned() -> None:
            await asyncio.to_thread(archive_partitions, sorted(agent.owned))
            await registry.prune(time.time())  # workers gone for a day leave the per-process hashes

        while not stop.is_set():
            await model.run(follow_model)
            await heartbeat.run(beat)
            await quality.run(publish_quality)
            if time.monotonic() - last_archive > settings.archive_every_s:
                last_archive = time.monotonic()
                await drain.run(archive_owned)
            await asyncio.sleep(1.0)

    async def recreate_topics() -> None:
        """Put back the topics a broker restart lost, before a client auto-creates them with its default count."""
        reported: dict[str, int] = {}
        while not stop.is_set():
            try:
                created, mismatched = await keep_topics(settings.kafka_servers, settings.partitions,
                                                        retention_s=settings.topic_retention_s)
                if created:
                    log.warning("recreated topics %s (broker restarted?)", created)
                if mismatched and mismatched != reported:
                    log.error("topics %s have other partition counts than PRIVADS_PARTITIONS=%d (created by another "
                              "client after a broker restart?); events are still routed by user, but recreate them "
                              "with the configured count", mismatched, settings.partitions)
                reported = mismatched
            except Exception as e:  # noqa: BLE001 - the broker may be down: try again at the next tick
                log.warning("topic check: %s: %s", type(e).__name__, e)
            await asyncio.sleep(2.0)

    async def attribute_and_learn() -> None:
        """Impressions and clicks of the owned partitions → labels, posteriors, counters."""
        last_tick, replay = 0.0, False
        # a failed batch (Redis away or full, the broker gone, a bug) is logged once per reason and retried from
        # the checkpoints with backoff; the loop never ends on it
        applying = Step("applying a batch (retried from the checkpoints)", log, base_s=0.5, max_s=5.0)
        while not stop.is_set():
            try:
                if replay:  # a batch failed half-way: start again from what Redis committed
                    agent.to_seek |= agent.owned
                    replay = False
                if agent.to_seek:
                    parts, agent.to_seek = agent.to_seek & agent.owned, set()
                    await agent.seek_to_checkpoints(parts)
                batch = await consumer.getmany(timeout_ms=100, max_records=settings.worker_batch)
                tick = time.monotonic() - last_tick >= 1.0
                if tick:
                    last_tick = time.monotonic()
                await agent.step(batch, tick)
                if tick:  # the pending events of users erased lately, scrubbed off the API's request path
                    for p in sorted(agent.owned):
                        await agent.store.scrub_erased(p)
                    if isinstance(r, Cluster):  # what no commit of this worker acknowledged: a dead owner's
                        for p in sorted(agent.owned - set(agent.unfolded)):
                            tips = await agent.store.durable_tips(p)
                            agent.unfolded.update(tips.outbox)
                            agent.durable_archive.update(tips.archive)
                    await agent.fold()  # on a cluster, outboxes a failed fold left
                applying.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - see above: logged once, backed off, replayed
                replay = True
                await asyncio.sleep(applying.failed(e))
                if isinstance(r, Cluster):  # a failover may have moved the slots: read the map again
                    with contextlib.suppress(RedisError):
                        await r.refresh()

    tasks = [asyncio.create_task(t, name=n) for t, n in (
        (attribute_and_learn(), "attribute_and_learn"), (index_ads(settings, indexer, producer, stop), "index_ads"),
        (timers(), "timers"), (recreate_topics(), "recreate_topics"))]
    loop.run_in_executor(None, indexer.encoder.warm)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    owned = sorted(agent.owned)
    await consumer.stop()
    await producer.stop()
    await asyncio.to_thread(archive_partitions, owned, True)  # leave nothing committed but unarchived
    archive_redis.close()
    await r.aclose()
    for task in done:
        if task is not stopper and (exc := task.exception()) is not None:
            raise exc


def run_worker(settings: Settings) -> None:
    """Run the worker in the foreground until SIGTERM/SIGINT."""
    asyncio.run(run(settings))

