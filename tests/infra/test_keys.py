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
    made = [keys.user("x"), keys.checkpoint(1), keys.buckets(1), keys.pending(1, 1), keys.orphans(1),
            keys.archive(1), keys.erased("x"), keys.arm("x", 1), keys.ad("x"), keys.embedding("x")]
    assert len(set(made)) == len(made)
    assert keys.pending(1, 2) != keys.pending(12, 0) and keys.user("ad:x") != keys.ad("x")
