"""Unit tests for the Redis key layout and packed user state (``infra.keys``)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from privads.infra import keys


@pytest.mark.parametrize("d", [1, 2, 64])
def test_pack_unpack_round_trip(d):
    rng = np.random.default_rng(d)
    mean = rng.standard_normal(d).astype(np.float32)
    prec = rng.uniform(1, 100, d).astype(np.float32)
    for count in (0, 1, 12345, 2**32 - 1):
        m, q, c = keys.unpack_user(keys.pack_user(mean, prec, count))
        np.testing.assert_array_equal(m, mean)
        np.testing.assert_array_equal(q, prec)
        assert c == count and isinstance(c, int)
        assert m.dtype == np.float32 and q.dtype == np.float32 and m.shape == q.shape == (d,)


def test_packed_size_at_64_dimensions():
    # 4-byte count header + mean (64 × float32) + precision (64 × float32) = 4 + 2·64·4 = 516 bytes
    blob = keys.pack_user(np.zeros(64, np.float32), np.ones(64, np.float32), 3)
    assert len(blob) == 4 + 2 * 64 * 4 == 516


def test_pack_layout_is_little_endian_header_then_mean_then_precision():
    # independent decoding with struct: '<I' count, then '<64f' mean, then '<64f' precision
    mean = np.arange(64, dtype=np.float32) / 8
    prec = np.arange(64, dtype=np.float32) + 100
    blob = keys.pack_user(mean, prec, 7)
    assert struct.unpack_from("<I", blob, 0) == (7,)
    assert struct.unpack_from("<64f", blob, 4) == tuple(mean.tolist())
    assert struct.unpack_from("<64f", blob, 4 + 256) == tuple(prec.tolist())


def test_pack_casts_float64_input_to_float32():
    mean = np.array([0.1, -2.5], np.float64)
    blob = keys.pack_user(mean, np.array([1.0, 2.0]), 1)
    assert len(blob) == 4 + 2 * 2 * 4
    m, q, _ = keys.unpack_user(blob)
    np.testing.assert_array_equal(m, mean.astype(np.float32))
    np.testing.assert_array_equal(q, [1.0, 2.0])


def test_unpacked_arrays_are_writable_copies():
    blob = keys.pack_user(np.ones(3, np.float32), np.ones(3, np.float32), 0)
    m, q, _ = keys.unpack_user(blob)
    m += 1  # must not raise (np.frombuffer over bytes is read-only)
    q[0] = 5
    np.testing.assert_array_equal(keys.unpack_user(blob)[0], np.ones(3))


# every kind of state lives in its own namespace: the same id never maps two kinds onto one key
def test_key_namespaces_never_collide():
    made = [keys.user("x", 4), keys.checkpoint(1), keys.buckets(1), keys.pending(1, 1), keys.orphans(1),
            keys.archive(1), keys.erased("x", 4), keys.arm("x", 1), keys.arm("x", 1, 3600), keys.arm("x", 1, 86400),
            keys.ad("x"), keys.embedding("x")]
    assert len(set(made)) == len(made)
    assert keys.pending(1, 2) != keys.pending(12, 0) and keys.user("ad:x", 4) != keys.ad("x")


# --- arm counter roll-ups -------------------------------------------------------------------------------------


def _minutes(cover: list[tuple[int, int]]) -> list[int]:
    """The minutes a cover's buckets span, in order."""
    out: list[int] = []
    for span, b in cover:
        m = span // keys.ARM_BUCKET_S
        out.extend(range(b * m, (b + 1) * m))
    return out


# within the minute counters' life, the cover tiles the window exactly, with at most 59 + 23 buckets at each edge
# plus one per whole day
@pytest.mark.parametrize("seed", range(5))
def test_arm_cover_tiles_a_recent_window_exactly_with_few_buckets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    now = 1_800_000_000.0 + float(rng.integers(0, 86400))
    for _ in range(200):
        length = int(rng.integers(1, 7 * 1440))  # minutes, within the 8 days minute counters are kept
        end = int(now) // 60 + 1
        cover = keys.arm_cover(end - length, end, now)
        assert _minutes(cover) == list(range(end - length, end))
        assert len(cover) <= 2 * (59 + 23) + length // 1440


def test_arm_cover_of_a_year_is_about_five_hundred_buckets() -> None:
    now = 1_800_000_123.0
    end = int(now) // 60 + 1
    cover = keys.arm_cover(end - 366 * 1440, end, now)
    assert len(cover) <= 59 + 23 + 366 + 23 + 59
    minutes = _minutes(cover)
    assert minutes == list(range(minutes[0], end))  # contiguous up to now
    # a start older than the hourly counters' life (93 days) moves back to its day's start: at most a day early
    assert minutes[0] % 1440 == 0 and 0 <= (end - 366 * 1440) - minutes[0] < 1440


def test_arm_cover_start_moves_to_the_hour_once_minutes_are_gone() -> None:
    now = 1_800_000_000.0
    end = int(now) // 60 + 1
    first = end - 10 * 1440 + 17  # 10 days back: the minute counters (8 days) are gone, the hourly ones are not
    minutes = _minutes(keys.arm_cover(first, end, now))
    assert minutes[0] == first - first % 60 and minutes[-1] == end - 1


def test_an_event_counts_once_in_each_span_and_each_span_expires_after_its_life() -> None:
    minute = 30_000_007
    rolled = keys.arm_rollup("treatment", minute)
    assert rolled == [keys.arm("treatment", minute), keys.arm("treatment", minute // 60, 3600),
                      keys.arm("treatment", minute // 1440, 86400)]
    assert [keys.arm_ttl(k) for k in rolled] == [ttl for _, ttl in keys.ARM_SPANS.values()]
    assert keys.arm_ttl(keys.adstat("treatment", "clicks")) is None and keys.arm_ttl(keys.STATS) is None


# --- hash slots: everything one transaction touches shares a Redis Cluster slot ----------------------------------


@pytest.mark.parametrize("partitions", [1, 4, 6, 16])
def test_a_partitions_keys_and_its_users_share_one_slot(partitions):
    from redis.crc import key_slot

    from privads.infra.partitioning import owner

    for p in range(partitions):
        slot = key_slot(keys.checkpoint(p).encode())
        mine = [keys.buckets(p), keys.pending(p, 7), keys.orphans(p), keys.archive(p), keys.outbox(p), keys.seen(p),
                keys.population(p), keys.erasures(p), keys.erasing(p)]
        assert {key_slot(k.encode()) for k in mine} == {slot}
    for user in ("alice", "a/b", "{x}", "u:{3}:y", "ad:x", "ü" * 40):
        home = owner(user.encode(), partitions)
        slot = key_slot(keys.checkpoint(home).encode())
        assert key_slot(keys.user(user, partitions).encode()) == slot
        assert key_slot(keys.erased(user, partitions).encode()) == slot
        assert keys.user_id_of(keys.user(user, partitions)) == user
        assert keys.user_id_of(keys.user(user, partitions).encode()) == user


def test_the_global_counters_share_one_slot_and_the_catalog_another():
    from redis.crc import key_slot

    counters = [keys.STATS, keys.FRESHNESS, keys.DP_MAX_UPDATES, keys.ARMS, keys.FOLDED, keys.ADSTAT_LOG,
                keys.adstat("treatment", "clicks"), *keys.arm_rollup("control", 29_000_000)]
    catalog = [keys.ADS, keys.CATALOG_LOG, keys.ad("x"), keys.ad("{y}"), keys.embedding("abc"),
               keys.EMBEDDINGS_UNUSED]
    assert len({key_slot(k.encode()) for k in counters}) == 1
    assert len({key_slot(k.encode()) for k in catalog}) == 1
    assert keys.parse_adstat(keys.adstat("a:b", "shown")) == ("a:b", "shown")
    assert keys.parse_adstat(keys.ADSTAT_LOG) is None and keys.parse_adstat(keys.STATS) is None
    assert keys.arm_ttl(keys.arm("x", 1, 3600)) == keys.ARM_SPANS[3600][1]
