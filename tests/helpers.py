"""Plain helpers for integration tests: produce and read real Kafka topics."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from privads.infra import keys

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CATALOG = REPO / "data" / "sample_ads.jsonl"


def produce(servers: str, topic: str, messages: list[tuple[str | None, bytes | dict]]) -> None:
    """Produce (key, value) pairs with kafka-python and wait until the broker has them."""
    producer = KafkaProducer(bootstrap_servers=servers, acks=1)
    try:
        for key, value in messages:
            raw = json.dumps(value).encode() if isinstance(value, dict) else value
            producer.send(topic, key=key.encode() if key is not None else None, value=raw)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)


def topic_partitions(servers: str) -> dict[str, int]:
    """Every topic on the broker and its partition count."""
    c = KafkaConsumer(bootstrap_servers=servers)
    try:
        return {t: len(c.partitions_for_topic(t) or ()) for t in c.topics()}
    finally:
        c.close()


def read_topic(servers: str, topic: str, timeout: float = 2.0) -> list[dict]:
    """Every message currently in ``topic`` (all partitions, from the start), JSON-decoded."""
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False,
                             consumer_timeout_ms=int(timeout * 1000))
    try:
        parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        return [json.loads(m.value) for m in consumer]
    finally:
        consumer.close()


def sample_ads(categories: list[str], per_category: int, bid: float | None = None) -> list[dict]:
    """Active ads of the committed sample catalog, ``per_category`` of each category."""
    out: dict[str, list[dict]] = {c: [] for c in categories}
    for line in SAMPLE_CATALOG.read_text().splitlines():
        ad = json.loads(line)
        if ad["category"] in out and ad["active"] and len(out[ad["category"]]) < per_category:
            if bid is not None:
                ad["bid"] = bid
            out[ad["category"]].append(ad)
    return [a for c in categories for a in out[c]]


def impression(user_id: str, ad_id: str, *, event_id: str | None = None, ts: float | None = None,
               policy: str = "treatment", position: int = 0, propensity: float | None = 0.5) -> dict:
    return {"event_id": event_id or uuid.uuid4().hex, "ts": ts if ts is not None else time.time(),
            "user_id": user_id, "ad_id": ad_id, "position": position, "propensity": propensity,
            "policy": policy, "model_version": None, "request_id": uuid.uuid4().hex}


def click(imp: dict, *, event_id: str | None = None, value: float | None = None) -> dict:
    out = {"event_id": event_id or uuid.uuid4().hex, "ts": time.time(), "impression_id": imp["event_id"],
           "user_id": imp["user_id"], "ad_id": imp["ad_id"]}
    if value is not None:
        out["value"] = value
    return out


def obd_dir() -> Path | None:
    """The Open Bandit Dataset sample shipped in the obp==0.4.1 wheel (located without importing obp)."""
    import importlib.util

    spec = importlib.util.find_spec("obp")
    for root in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(root) / "dataset" / "obd"
        if (cand / "bts" / "all" / "all.csv").is_file():
            return cand
    return None


def counters(r) -> dict[tuple[str, str], int]:
    """Every per-arm, per-ad and global counter in Redis: (key, field) → value; events processed per topic left out.

    ``r`` is a sync ``redis.Redis``. Compare two of them with ``moved``.
    """
    out: dict[tuple[str, str], int] = {}
    for pattern in ("arm:*", "adstat:*"):
        for key in r.scan_iter(pattern):
            if r.type(key) == b"hash":
                out.update({(key.decode(), f.decode()): int(v) for f, v in r.hgetall(key).items()})
    out.update({(keys.STATS, f.decode()): int(v) for f, v in r.hgetall(keys.STATS).items()
                if not f.startswith(b"processed:")})
    return out


def moved(before: dict, after: dict) -> dict:
    """What changed between two ``counters``: (key, field) → difference."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


def learner_examples(settings):
    """What a learner cycle would train on now (``learner.cycle.load_examples``), read as the cycle reads it."""
    import asyncio

    from privads.infra.store import CatalogStore, connect
    from privads.learner.cycle import load_examples

    async def load():
        r = connect(settings.redis_url)
        try:
            store = CatalogStore(r)
            entries, emb = await store.read(await store.all_ids())
            return await load_examples(settings, r, {e.ad_id: v for e, v in zip(entries, emb, strict=True)},
                                       {e.ad_id: e for e in entries})
        finally:
            await r.aclose()

    return asyncio.run(load())


def user_key(r, user_id: str) -> str:
    """A user's state key, with the partition count the workers registered (``keys.PARTITIONS``)."""
    return keys.user(user_id, int(r.get(keys.PARTITIONS)))
