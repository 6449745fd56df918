"""Redis readers against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import redis

from privads.infra import keys, records
from privads.infra.errors import Conflict
from privads.infra.processes import Process
from privads.infra.redis_cluster import start_redis_cluster, stop_processes
from privads.infra.store import (
    ARCHIVE_REPLY,
    SERIES_MAX_POINTS,
    AdCountLog,
    ArmBucket,
    Cluster,
    Counters,
    PartitionStore,
    PartitionWrites,
    _write_partition,
    ad_count_deltas,
    connect,
    note_dead_letters,
)
from privads.ranker.adcounts import AdCounts
from privads.ranker.scoring import AdEvidence
from privads.ranker.updates import ad_posterior

pytestmark = pytest.mark.integration


# the per-ad counts the workers keep feed the Beta posterior; unknown ads read as zero (the prior)
def test_ad_counts_snapshot_then_log_feed_the_posteriors(infra, rds: redis.Redis) -> None:
    rds.delete(keys.ADSTAT_LOG, *(keys.adstat(p, w) for p in ("treatment", "control") for w in keys.AD_COUNT_FIELDS))
    rds.hset(keys.adstat("treatment", "clicks"), mapping={"ad-1": 3})
    rds.hset(keys.adstat("treatment", "shown"), mapping={"ad-1": 10, "ad:2": 4})
    rds.hset(keys.adstat("treatment", "expected"), mapping={"ad-1": 1_500_000})
    rds.hset(keys.adstat("control", "clicks"), mapping={"ad-1": 1})
    rds.hset(keys.adstat("control", "shown"), mapping={"ad-1": 50})
    rds.xadd(keys.ADSTAT_LOG, {"d": json.dumps({"treatment": {"ad-1": [1, 1]}})})  # before the snapshot: in it

    async def read() -> tuple[AdCounts, list[dict]]:
        r = connect(infra.redis_url)
        try:
            log = AdCountLog(r)
            snapshot, last = await log.snapshot(["treatment", "control"])
            counts = AdCounts()
            counts.reset(snapshot)
            assert counts.of_arm("treatment") == {"ad-1": (3, 10, 1_500_000), "ad:2": (0, 4, 0)}
            assert await log.since(last) == ([], last)
            # a worker's batch after the snapshot arrives through the log only
            await r.xadd(keys.ADSTAT_LOG, {"d": json.dumps({"treatment": {"ad:2": [2, 5, 250_000],
                                                                          "ad-9": [0, 1, 50_000]}})})
            deltas, newer = await log.since(last, block_ms=1000)
            assert newer != last
            for d in deltas:
                counts.apply(d)
            return counts, deltas
        finally:
            await r.aclose()

    counts, deltas = asyncio.run(read())
    assert deltas == [{"treatment": {"ad:2": [2, 5, 250_000], "ad-9": [0, 1, 50_000]}}]
    got = [counts.get("treatment", a) for a in ("ad-1", "ad:2", "never-shown")]
    assert got == [(3, 10, 1_500_000), (2, 9, 250_000), (0, 0, 0)] and counts.get("control", "ad-1") == (1, 50, 0)
    clicks, shown = np.array([c for c, _, _ in got]), np.array([n for _, n, _ in got])
    a, b = ad_posterior(clicks, shown, base_rate=0.05, strength=20.0)  # the popularity control's Beta
    assert a.tolist() == [4.0, 3.0, 1.0] and b.tolist() == [26.0, 26.0, 19.0]
    expected = np.array([e for _, _, e in got]) / keys.EXPECTED_SCALE  # the calibration factor's Gamma
    np.testing.assert_allclose(AdEvidence(clicks, expected, 5.0).mean(), [8 / 6.5, 7 / 5.25, 1.0])


def test_ad_count_deltas_keep_only_the_per_ad_counters() -> None:
    counters = {keys.adstat("treatment", "clicks"): {"a": 2, "b": 0}, keys.adstat("treatment", "shown"): {"a": 5},
                keys.adstat("treatment", "labelled"): {"a": 4}, keys.adstat("odd:arm", "shown"): {"c": 1},
                keys.adstat("treatment", "expected"): {"a": 120_000},
                keys.STATS: {"processed:x": 9},
                keys.arm("treatment", 7): {"clicks": 1}}
    assert ad_count_deltas(counters) == {"treatment": {"a": [2, 5, 120_000]}, "odd:arm": {"c": [0, 1, 0]}}


def test_embeddings_no_ad_uses_are_marked_then_dropped_after_the_grace(infra, rds: redis.Redis) -> None:
    """Mark and sweep of the text-hash cache: only an embedding unused on two passes ``grace`` apart goes."""
    from privads.infra.records import Ad
    from privads.infra.store import CatalogStore

    vec = {h: np.full(384, i, np.float32) for i, h in enumerate(["h-one", "h-two", "h-three"])}

    async def run() -> None:
        r = connect(infra.redis_url)
        try:
            store = CatalogStore(r)
            ads = [Ad(ad_id="gc-a", text="one", bid=1.0, ts=1.0), Ad(ad_id="gc-b", text="two", bid=1.0, ts=1.0)]
            await store.upsert(ads, ["h-one", "h-two"], {"h-one": vec["h-one"], "h-two": vec["h-two"]})
            # gc-a's text changes: "h-one" is no ad's any more
            await store.upsert([Ad(ad_id="gc-a", text="three", bid=1.0, ts=2.0)], ["h-three"],
                               {"h-three": vec["h-three"]})
            assert await store.drop_unused_embeddings(now=100.0, grace_s=50.0) == 0  # marked only
            assert rds.zscore(keys.EMBEDDINGS_UNUSED, "h-one") == 100.0 and rds.exists(keys.embedding("h-one"))
            assert await store.drop_unused_embeddings(now=120.0, grace_s=50.0) == 0  # not unused long enough
            assert await store.drop_unused_embeddings(now=150.0, grace_s=50.0) == 1
            assert not rds.exists(keys.embedding("h-one")) and rds.zcard(keys.EMBEDDINGS_UNUSED) == 0
            assert rds.exists(keys.embedding("h-two")) and rds.exists(keys.embedding("h-three"))
            # an unused one used again before the sweep is kept, and its mark dropped
            await store.upsert([Ad(ad_id="gc-b", text="three", bid=1.0, ts=3.0)], ["h-three"],
                               {"h-three": vec["h-three"]})
            assert await store.drop_unused_embeddings(now=200.0, grace_s=50.0) == 0
            await store.upsert([Ad(ad_id="gc-c", text="two", bid=1.0, ts=4.0)], ["h-two"], {"h-two": vec["h-two"]})
            assert await store.drop_unused_embeddings(now=300.0, grace_s=50.0) == 0
            assert rds.exists(keys.embedding("h-two")) and rds.zcard(keys.EMBEDDINGS_UNUSED) == 0
            entries, emb = await store.read(["gc-a", "gc-b", "gc-c"])
            assert [e.ad_id for e in entries] == ["gc-a", "gc-b", "gc-c"] and emb.shape == (3, 384)
        finally:
            await r.aclose()

    asyncio.run(run())


# /lift reads the roll-ups: the counts of any window equal those of the events in its minutes, from a bounded
# number of reads; /lift/series keeps its buckets few and adds up to the same events
def test_arm_counts_of_any_window_add_up_the_events_in_it(infra, rds: redis.Redis) -> None:
    rng = np.random.default_rng(3)
    now = float(int(time.time()))
    last = int(now) // 60
    minutes = rng.integers(last - 60 * 1440, last + 1, size=3000)  # events over 60 days, one per draw
    arms = rng.choice(["treatment", "control"], size=len(minutes))
    rds.delete(keys.ARMS)
    rds.sadd(keys.ARMS, "treatment", "control")
    pipe = rds.pipeline(transaction=False)
    for m, a in zip(minutes.tolist(), arms.tolist(), strict=True):
        for key in keys.arm_rollup(a, m):  # what a worker's batch writes per event
            pipe.hincrby(key, "impressions", 1)
            pipe.hincrby(key, "clicks", m % 2)
            if m % 2:  # a click worth 0.25 on odd minutes
                pipe.hincrbyfloat(key, keys.ARM_VALUE, 0.25)
                pipe.hincrbyfloat(key, keys.ARM_VALUE_SQ, 0.0625)
    pipe.execute()

    async def go() -> None:
        r = connect(infra.redis_url)
        try:
            counters = Counters(r)
            for window in (90.0, 3600.0, 5000.0, 86400.0, 7 * 86400.0, 6.5 * 86400):
                got = await counters.arm_counts(window, now)
                lo = int(now - window) // 60
                for a in ("treatment", "control"):
                    sel = (minutes >= lo) & (arms == a)
                    clicks = int((minutes[sel] % 2).sum())
                    assert got[a] == ArmBucket(int(sel.sum()), clicks, 0.25 * clicks, 0.0625 * clicks), window
                span, starts, series = await counters.arm_series(window, now)
                assert len(starts) <= SERIES_MAX_POINTS + 1 and span == (60 if window <= 43200 else 3600)
                for a in ("treatment", "control"):
                    sel = (minutes >= int(starts[0]) // 60) & (arms == a)
                    assert sum(series[a]["impressions"]) == int(sel.sum())
                    assert sum(series[a]["value"]) == 0.25 * int((minutes[sel] % 2).sum())
            # 60 days: minute buckets past 8 days are no longer read, the start moves back to its hour
            got = await counters.arm_counts(60 * 86400.0, now)
            assert sum(c.impressions for c in got.values()) == len(minutes)
        finally:
            await r.aclose()

    asyncio.run(go())


# --- commits on a Redis Cluster --------------------------------------------------------------------------------


def _writes(p: int, seq_users: dict[str, bytes], policy: str, impressions: int) -> PartitionWrites:
    """One partition's writes with every kind of command, so that the archive entry's reply index is exercised."""
    return PartitionWrites(
        partition=p, offsets={"privads.impressions": 10 + p}, fingerprints={"privads.impressions": 1}, closed_before=0,
        marks={}, pending={5: {f"i{p}": b"x"}, 6: {f"j{p}": b"y"}}, put_orphans={f"o{p}": b"z"},
        del_orphans={"gone"}, drop_buckets={1}, archive={b"imp": b"", b"lab": b""},
        users=seq_users, counters={keys.STATS: {"impressions": impressions},
                                   keys.arm(policy, 7): {"clicks": 1, keys.ARM_VALUE: 0.75, keys.ARM_VALUE_SQ: 0.5625}},
        arms={policy})


def test_cluster_commits_each_partition_in_its_slot_and_folds_the_counters_once(tmp_path) -> None:
    nodes: list[Process] = []
    try:
        cluster = start_redis_cluster(tmp_path, nodes)

        async def go() -> None:
            r = connect(cluster.url)
            assert isinstance(r, Cluster)
            try:
                store = PartitionStore(r)
                parts = [p for p in range(6)]
                writes = [_writes(p, {f"u{p}": b"state"}, "treatment" if p % 2 else "control", 10 * p + 1)
                          for p in parts]
                done = await store.commit({p: 0 for p in parts}, writes, max_user_updates=3)
                assert done is not None and sorted(done.outbox) == parts and sorted(done.archive) == parts
                for p in parts:  # the ids a replica holds are the entries just written
                    assert (await r.xrevrange(keys.archive(p), count=1))[0][0].decode() == done.archive[p]
                    assert await r.get(keys.user_in(f"u{p}", p)) == b"state"
                with pytest.raises(Conflict):  # fenced on seq, per partition
                    await store.commit({0: 0}, [_writes(0, {}, "control", 1)])
                # nothing global moves before a fold; then exactly once, however often folded
                assert await r.hget(keys.STATS, "impressions") is None
                for _ in range(2):
                    for p in parts:
                        await store.fold(p, done.outbox[p])
                assert int(await r.hget(keys.STATS, "impressions")) == sum(10 * p + 1 for p in parts)
                assert int(await r.hget(keys.arm("treatment", 7), "clicks")) == 3
                # the clicks' values are floats, added as floats through the outbox and the fold
                assert float(await r.hget(keys.arm("treatment", 7), keys.ARM_VALUE)) == pytest.approx(2.25)
                assert float(await r.hget(keys.arm("control", 7), keys.ARM_VALUE_SQ)) == pytest.approx(3 * 0.5625)
                assert {a.decode() for a in await r.smembers(keys.ARMS)} == {"treatment", "control"}
                assert await r.zscore(keys.DP_MAX_UPDATES, "max") == 3
                assert all([await r.xlen(keys.outbox(p)) == 0 for p in parts])
                # a later commit folds only its own increments
                again = await store.commit({1: 1}, [_writes(1, {}, "treatment", 100)])
                assert again is not None
                await store.fold(1, again.outbox[1])
                assert int(await r.hget(keys.STATS, "impressions")) == sum(10 * p + 1 for p in parts) + 100
                # a dead owner's leftover, which no commit of this process acknowledged: fenced, then folded
                box = {"c": {keys.STATS: {"impressions": 1000}}, "a": [], "m": 0}
                left = (await r.xadd(keys.outbox(4), {"d": json.dumps(box)})).decode()
                tips = await store.durable_tips(4)
                assert tips.outbox == {4: left} and tips.archive == {4: done.archive[4]}
                await store.fold(4, tips.outbox[4])
                assert int(await r.hget(keys.STATS, "impressions")) == sum(10 * p + 1 for p in parts) + 1100
                assert (await store.durable_tips(5)).outbox == {}  # folded and trimmed: nothing left
            finally:
                await r.aclose()

        asyncio.run(go())
    finally:
        stop_processes(nodes)


# the reply of a partition's archive XADD is at ``ARCHIVE_REPLY``, whatever else the commit writes
@pytest.mark.parametrize("fields", [(), ("pending",), ("drop_buckets", "put_orphans"), ("pending", "del_orphans")])
def test_the_archive_entry_id_is_read_from_its_own_reply(infra, fields) -> None:
    full = _writes(3, {}, "control", 1)
    w = PartitionWrites(partition=3, offsets={}, fingerprints={}, closed_before=0, marks={},
                        archive={b"imp": b"", b"lab": b""}, **{f: getattr(full, f) for f in fields})

    async def go() -> None:
        r = connect(infra.redis_url)
        try:
            pipe = r.pipeline(transaction=True)
            _write_partition(pipe, w)
            res = await pipe.execute()
            assert res[ARCHIVE_REPLY] == (await r.xrevrange(keys.archive(3), count=1))[0][0]
        finally:
            await r.aclose()

    asyncio.run(go())


def test_the_dead_letters_last_reasons_are_kept_newest_first_without_payloads(infra, rds) -> None:
    rds.delete(keys.DEAD_LETTERS_RECENT)
    letters = [records.dead_letter("privads.clicks", 1, i, f"reason {i} " + "x" * 300, b"secret payload")
               for i in range(keys.DEAD_LETTERS_KEPT + 5)]

    async def go() -> list[dict]:
        r = connect(infra.redis_url)
        try:
            await note_dead_letters(r, letters[:3], now=10.0)
            await note_dead_letters(r, letters[3:], now=20.0)
            return await Counters(r).recent_dead_letters(n=100)
        finally:
            await r.aclose()

    got = asyncio.run(go())
    assert len(got) == keys.DEAD_LETTERS_KEPT  # the newest only
    assert [d["offset"] for d in got[:2]] == [keys.DEAD_LETTERS_KEPT + 4, keys.DEAD_LETTERS_KEPT + 3]
    assert all(len(d["error"]) == keys.DEAD_LETTER_REASON_CHARS and d["topic"] == "privads.clicks" for d in got)
    assert b"secret payload" not in b"".join(rds.lrange(keys.DEAD_LETTERS_RECENT, 0, -1))
