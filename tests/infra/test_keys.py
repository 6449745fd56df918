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


def _tastes(rows: list[tuple[int, float, float, float]]) -> np.ndarray:
    t = np.zeros(len(rows), keys.TASTE_DTYPE)
    for i, r in enumerate(rows):
        t[i] = r
    return t


def test_a_state_with_tastes_round_trips_and_its_posterior_reads_as_without():
    mean, prec = np.arange(64, dtype=np.float32) / 7, np.arange(64, dtype=np.float32) + 1
    tastes = _tastes([(3, 1.0, 0.25, 4.0), (99, 0.0, 1.5, 9.0), (2**32 - 1, 2.0, 0.5, 1.0)])
    blob = keys.pack_user(mean, prec, 5, tastes)
    # the posterior's layout is unchanged; 16 bytes per taste and their number follow
    assert len(blob) == 4 + 2 * 64 * 4 + 16 * 3 + 4
    assert blob[:516] == keys.pack_user(mean, prec, 5)
    m, q, c = keys.unpack_user(blob)
    np.testing.assert_array_equal(m, mean)
    np.testing.assert_array_equal(q, prec)
    assert c == 5
    back = keys.unpack_tastes(blob)
    assert back.tolist() == tastes.tolist()
    back["clicks"] += 1  # a writable copy
    assert keys.unpack_tastes(blob).tolist() == tastes.tolist()


def test_a_state_written_before_tastes_reads_with_none():
    blob = struct.pack("<I", 2) + np.ones(64, "<f4").tobytes() + np.full(64, 3, "<f4").tobytes()
    assert keys.unpack_tastes(blob).size == 0
    m, q, c = keys.unpack_user(blob)
    assert c == 2 and m.shape == q.shape == (64,) and q[0] == 3
    for d in (1, 2, 3):  # any dimension, any number of tastes: the length modulo 8 tells the layouts apart
        for n in (1, 2, 3):
            t = _tastes([(i + 1, 0.0, 1.0, 1.0) for i in range(n)])
            blob = keys.pack_user(np.ones(d), np.ones(d), 1, t)
            assert keys.unpack_user(blob)[0].shape == (d,) and keys.unpack_tastes(blob).size == n


def test_category_hash_is_stable_and_zero_only_without_a_category():
    assert keys.category_hash("gaming") == 1015674553  # blake2b: the same in every process and release
    assert keys.category_hash(None) == keys.category_hash("") == 0
    assert keys.category_hash("gaming") != keys.category_hash("insurance")


def test_merge_tastes_adds_to_entries_creates_new_ones_and_skips_no_category():
    tastes = _tastes([(5, 1.0, 2.0, 3.0)])
    out = keys.merge_tastes(tastes, np.array([5, 7, 0, 7], np.uint32), np.array([1.0, 0.0, 1.0, 1.0]),
                            np.array([0.5, 0.25, 9.0, 0.25]), np.array([1.0, 1.0, 1.0, 0.0]))
    assert out.tolist() == [(5, 2.0, 2.5, 4.0), (7, 1.0, 0.5, 1.0)]
    assert tastes.tolist() == [(5, 1.0, 2.0, 3.0)]  # not modified


def test_merge_tastes_keeps_the_categories_with_the_most_evidence_sorted_by_hash():
    hashes = np.array([40, 10, 30, 20], np.uint32)
    out = keys.merge_tastes(keys.no_tastes(), hashes, np.zeros(4), np.array([4.0, 1.0, 3.0, 2.0]), np.ones(4), cap=2)
    assert out["hash"].tolist() == [30, 40]


def test_the_window_scales_a_categorys_counts_back_to_it_and_keeps_their_ratio():
    tastes = _tastes([(3, 6.0, 3.0, 400.0), (8, 1.0, 2.0, 200.0), (9, 0.0, 1.0, 10.0)])
    out = keys.merge_tastes(tastes, np.array([8, 9], np.uint32), np.array([0.0, 1.0]), np.array([0.5, 0.5]),
                            np.ones(2), window=200.0)
    # 3: over the window, halved; 8: one impression over, scaled by 200/201; 9: under, as merged
    assert out.tolist()[0] == (3, 3.0, 1.5, 200.0)
    np.testing.assert_allclose([tuple(out[1])[1:]], [(200 / 201, 2.5 * 200 / 201, 200.0)], rtol=1e-6)
    assert out.tolist()[2] == (9, 1.0, 1.5, 11.0)
    # the user's factor on each category, (b + clicks) / (b + expected), moves toward the population's only
    # through the prior's weight; without a window nothing is scaled
    assert keys.merge_tastes(tastes, np.array([8], np.uint32), np.zeros(1), np.zeros(1), np.ones(1)).tolist()[0] \
        == (3, 6.0, 3.0, 400.0)
    np.testing.assert_array_equal(keys.window_scale(np.array([[0.0, 50.0], [100.0, 400.0]]), 100.0),
                                  [[1.0, 1.0], [1.0, 0.25]])
    assert keys.window_scale(np.array([1e9]), 0.0).tolist() == [1.0]


def test_a_changed_taste_is_followed_within_the_window():
    """Clicked at 3× the expected rate for 2,000 impressions, then never: ψ falls below 1 within ~1.5 windows
    of the new taste; without the window, not in 3,000."""
    b = 2.0

    def after_the_change(window: float) -> list[float]:
        tastes, psi = keys.no_tastes(), []
        for clicks in [0.3] * 20 + [0.0] * 30:  # batches of 100 impressions, 0.1 expected clicks each
            tastes = keys.merge_tastes(tastes, np.full(100, 5, np.uint32), np.full(100, clicks), np.full(100, 0.1),
                                       np.ones(100), window=window)
            if clicks == 0.0:
                psi.append(float((b + tastes["clicks"][0]) / (b + tastes["expected"][0])))
        return psi

    windowed, unbounded = after_the_change(200.0), after_the_change(0.0)
    # (b + 60·(2/3)^k) / (b + 20) per batch k: 1.91, 1.30, 0.90
    assert [psi < 1 for psi in windowed[:3]] == [False, False, True]
    np.testing.assert_allclose(windowed[2], (b + 60 * (2 / 3) ** 3) / (b + 20), rtol=1e-5)
    assert min(unbounded) > 1  # 600 clicks against 200 + 10 per batch expected


def test_taste_counts_reads_each_candidates_category_and_zero_where_unseen():
    tastes = _tastes([(3, 1.0, 0.5, 2.0), (8, 2.0, 4.0, 9.0)])
    clicks, expected = keys.taste_counts(tastes, np.array([8, 0, 5, 3, 9], np.uint32))
    assert clicks.tolist() == [2.0, 0.0, 0.0, 1.0, 0.0]
    assert expected.tolist() == [4.0, 0.0, 0.0, 0.5, 0.0]
    assert [a.tolist() for a in keys.taste_counts(keys.no_tastes(), np.array([3], np.uint32))] == [[0.0], [0.0]]


def test_merge_tastes_many_is_merge_tastes_per_user():
    rng = np.random.default_rng(2)
    users = [keys.no_tastes(), _tastes([(7, 1.0, 2.0, 3.0), (9, 0.0, 1.0, 1.0)]), _tastes([(2, 0.0, 0.5, 1.0)]),
             _tastes([(4, 1.0, 1.0, 1.0)])]
    m = 200
    idx = rng.integers(0, 3, m)  # user 3 has no event
    hashes = rng.integers(0, 12, m).astype(np.uint32)  # 0 among them: no category
    clicks, expected, shown = rng.integers(0, 2, m).astype(float), rng.random(m), np.ones(m)
    got = keys.merge_tastes_many(users, idx, hashes, clicks, expected, shown, cap=6)
    for u in range(4):
        mine = idx == u
        want = keys.merge_tastes(users[u], hashes[mine], clicks[mine], expected[mine], shown[mine], cap=6)
        assert got[u]["hash"].tolist() == want["hash"].tolist()
        for f in ("clicks", "expected", "shown"):
            np.testing.assert_allclose(got[u][f], want[f], rtol=1e-6)
    assert got[3] is users[3] and got[0].size == 6  # untouched: the same; capped
    # and merge_tastes itself against a plain dictionary
    want_d: dict[int, list[float]] = {7: [1.0, 2.0, 3.0], 9: [0.0, 1.0, 1.0]}
    mine = idx == 1
    for h, c, e, n in zip(hashes[mine].tolist(), clicks[mine], expected[mine], shown[mine], strict=True):
        if h:
            v = want_d.setdefault(h, [0.0, 0.0, 0.0])
            v[0] += c
            v[1] += e
            v[2] += n
    full = keys.merge_tastes(users[1], hashes[mine], clicks[mine], expected[mine], shown[mine], cap=64)
    assert full["hash"].tolist() == sorted(want_d)
    np.testing.assert_allclose(full["expected"], [want_d[h][1] for h in sorted(want_d)], rtol=1e-6)
