"""Which partition owns a key: Kafka's default (Java, kafka-python, aiokafka) murmur2 partitioner.

Producers disagree (librdkafka hashes with CRC32 by default), so the workers do
not trust the partition a message arrived on: a message whose key belongs to
another partition is forwarded there once, and every user is owned by exactly
one partition whatever client produced its events.
"""

from __future__ import annotations

from functools import lru_cache

from kafka.partitioner.default import murmur2


@lru_cache(maxsize=1_000_000)
def owner(key: bytes, partitions: int) -> int:
    """Partition that owns ``key`` among ``partitions`` (Java-compatible murmur2, positive modulo)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
