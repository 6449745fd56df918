"""The Parquet archive drain against a real redis-server: rows land once, by hour, even across a crash."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from helpers import impression
from privads.infra import keys
from privads.infra.records import Labelled
from privads.streams import archive

pytestmark = pytest.mark.integration
HOUR = 3600.0
T0 = 1_795_000_000.0 - 1_795_000_000.0 % HOUR  # the start of an hour


def add_entry(r: redis.Redis, partition: int, imps: list[dict], labels: list[Labelled]) -> None:
    r.xadd(keys.archive(partition), {b"imp": b"\n".join(json.dumps(i).encode() for i in imps),
                                     b"lab": msgspec.msgpack.encode(labels)})


def label(imp: dict, clicked: bool) -> Labelled:
    return Labelled(impression_id=imp["event_id"], user_id=imp["user_id"], ad_id=imp["ad_id"], ts=imp["ts"],
                    clicked=clicked, policy=imp["policy"], value=0.0)


def test_drain_writes_each_row_once_partitioned_by_hour(rds: redis.Redis, tmp_path: Path) -> None:
    imps = [impression(f"u{i}", "a1", ts=T0 + i * 900, event_id=f"i{i}") for i in range(8)]  # 2 hours
    imps[0]["context"] = {"page": "home"}  # unknown/extra fields survive in `raw`
    add_entry(rds, 5, imps[:4], [label(imps[0], True)])
    add_entry(rds, 5, imps[4:], [label(i, False) for i in imps[1:]])
    assert archive.drain(rds, tmp_path, 5) == 16
    assert rds.xlen(keys.archive(5)) == 0
    hours = sorted(p.name for p in (tmp_path / "impressions").iterdir())
    assert hours == [f"hour={archive.hour_of(T0)}", f"hour={archive.hour_of(T0 + HOUR)}"]
    t = archive.read_table(tmp_path, "impressions").to_pylist()
    assert sorted(r["event_id"] for r in t) == sorted(i["event_id"] for i in imps)
    assert json.loads(next(r for r in t if r["event_id"] == "i0")["raw"])["context"] == {"page": "home"}
    labs = archive.read_table(tmp_path, "labels").to_pylist()
    assert sorted((r["impression_id"], r["clicked"]) for r in labs) == sorted(
        [("i0", 1)] + [(f"i{i}", 0) for i in range(1, 8)])


def test_a_crash_between_write_and_trim_does_not_duplicate(rds: redis.Redis, tmp_path: Path) -> None:
    imps = [impression(f"c{i}", "a1", ts=T0 + i, event_id=f"c{i}") for i in range(6)]
    add_entry(rds, 6, imps[:3], [])
    # a drain that wrote its files and died before trimming the stream
    entries = rds.xrange(keys.archive(6))
    archive.write_chunk(tmp_path, 6, entries[0][0].decode().replace("-", "_"), entries)
    add_entry(rds, 6, imps[3:], [])  # more traffic committed meanwhile
    archive.drain(rds, tmp_path, 6)
    rows = archive.read_table(tmp_path, "impressions").to_pylist()
    assert sorted(r["event_id"] for r in rows) == sorted(i["event_id"] for i in imps)  # each exactly once
    files = list((tmp_path / "impressions").glob("hour=*/*.parquet"))
    assert len(files) == 1 and pq.read_table(files[0]).num_rows == 6


def test_drains_of_more_entries_than_a_stream_node_write_each_row_once(rds: redis.Redis, tmp_path: Path) -> None:
    # Redis keeps up to 100 entries per stream node: an approximate trim left a node's drained entries behind,
    # and the next drain wrote them again under another file name
    imps = [impression(f"n{i}", "a1", ts=T0 + i, event_id=f"n{i}") for i in range(700)]
    for i in range(0, 350):
        add_entry(rds, 7, [imps[i]], [])
    archive.drain(rds, tmp_path, 7, chunk=120)
    for i in range(350, 700):  # traffic after the first drains
        add_entry(rds, 7, [imps[i]], [])
    archive.drain(rds, tmp_path, 7, chunk=120)
    ids = [r["event_id"] for r in archive.read_table(tmp_path, "impressions").to_pylist()]
    assert len(ids) == 700 and sorted(ids) == sorted(i["event_id"] for i in imps)
    assert rds.xlen(keys.archive(7)) == 0


def test_read_recent_lists_only_the_window_hours_and_holds_at_most_the_limit(tmp_path: Path) -> None:
    # five hours of impressions, one chunk file per hour, written in time order (entry ids rise with time)
    for h in range(5):
        imps = [impression(f"u{i}", "a1", ts=T0 + h * HOUR + i * 60, event_id=f"h{h}-{i}") for i in range(10)]
        archive.write_chunk(tmp_path, 0, f"{int(T0 + h * HOUR) * 1000}_0",
                            [(b"1-0", {b"imp": b"\n".join(json.dumps(i).encode() for i in imps)})])
    # an hour before the window that cannot be read: listing it would fail the call
    old = tmp_path / "impressions" / f"hour={archive.hour_of(T0 - 5 * HOUR)}"
    old.mkdir(parents=True)
    (old / "p0-1_0.parquet").write_bytes(b"not parquet")

    assert archive.newest_ts(tmp_path) == T0 + 4 * HOUR + 9 * 60
    window = archive.read_recent(tmp_path, "impressions", since=T0 + HOUR, until=T0 + 3 * HOUR + 300)
    ts = window.column("ts").to_pylist()
    assert ts == sorted(ts) and min(ts) == T0 + HOUR and max(ts) == T0 + 3 * HOUR + 300 and len(ts) == 26
    newest = archive.read_recent(tmp_path, "impressions", since=T0, limit=15, columns=["event_id"])
    assert newest.column_names == ["event_id", "ts"]
    assert newest.column("event_id").to_pylist() == [f"h3-{i}" for i in range(5, 10)] + [f"h4-{i}" for i in range(10)]
    with pytest.raises(pa.ArrowInvalid):  # without a window the unreadable file is reached
        archive.read_recent(tmp_path, "impressions")


def test_prune_removes_only_the_hours_wholly_before_the_retention(tmp_path: Path) -> None:
    for h in range(4):
        imps = [impression(f"u{i}", "a1", ts=T0 + h * HOUR + i * 60, event_id=f"p{h}-{i}") for i in range(3)]
        archive.write_chunk(tmp_path, 0, f"{int(T0 + h * HOUR) * 1000}_0",
                            [(b"1-0", {b"imp": b"\n".join(json.dumps(i).encode() for i in imps)}),
                             (b"1-1", {b"lab": msgspec.msgpack.encode([label(imps[0], True)])})])
    # keep from the middle of hour 2 on: hours 0 and 1 go (both kinds), hour 2 stays whole
    assert archive.prune(tmp_path, T0 + 2 * HOUR + 1800) == 4
    for kind in ("impressions", "labels"):
        hours = sorted(d.name for d in (tmp_path / kind).iterdir())
        assert hours == [f"hour={archive.hour_of(T0 + h * HOUR)}" for h in (2, 3)]
    assert sorted(archive.read_table(tmp_path, "impressions").column("event_id").to_pylist())[0] == "p2-0"
    assert archive.prune(tmp_path, T0 + 2 * HOUR + 1800) == 0


def test_a_drain_renews_its_lock_per_chunk_and_stops_once_the_lock_is_someone_elses(rds: redis.Redis,
                                                                                   tmp_path: Path) -> None:
    # a worker killed mid-drain holds the partition's archive only until its lock's short TTL runs out, because a
    # live drainer renews it before each chunk; one whose lock expired and was taken stops instead of racing the taker
    imps = [impression(f"k{i}", "a1", ts=T0 + i, event_id=f"k{i}") for i in range(30)]
    for i in range(30):
        add_entry(rds, 9, [imps[i]], [])
    drainer = archive.Drainer(tmp_path, 1.0, "w1")
    lock = "archlock:9"
    rds.set(lock, "w1", ex=2)
    assert drainer._renew(rds, lock) and 2 < rds.ttl(lock) <= archive.Drainer.LOCK_S  # renewed to the full TTL
    asked = []

    def mine_twice() -> bool:
        asked.append(1)
        return len(asked) <= 2

    assert archive.drain(rds, tmp_path, 9, chunk=10, still_mine=mine_twice) == 20  # two chunks, then stopped
    assert rds.xlen(keys.archive(9)) == 10
    rds.set(lock, "w2", ex=60)  # expired and taken by another worker
    assert not drainer._renew(rds, lock) and rds.get(lock) == b"w2"
    assert drainer.run(rds, [9]) == 0 and rds.get(lock) == b"w2"  # neither drained nor released the other's lock
    rds.delete(lock)
    assert drainer.run(rds, [9]) == 10 and rds.get(lock) is None
    ids = [r["event_id"] for r in archive.read_table(tmp_path, "impressions").to_pylist()]
    assert sorted(ids) == sorted(i["event_id"] for i in imps)
