"""Topics and event records, defined once (README.md, "Events").

Decoding is strict on the fields the contract names and lenient on everything
else: unknown extra fields are kept in ``extra`` (never rejected).
"""

from __future__ import annotations

import base64
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson

from privads.infra.errors import InvalidEvent

# --- topics -----------------------------------------------------------------

IMPRESSIONS = "privads.impressions"
CLICKS = "privads.clicks"
ADS = "privads.ads"
DEAD_LETTER = "privads.dead-letter"
MODEL_UPDATES = "privads.model-updates"
# internal: impressions and clicks that arrived on a partition that does not own
# their key (another client's partitioner), forwarded once to the owner; the
# original topic travels in the ``privads-topic`` header
REPARTITION = "privads.repartition"
ORIGIN_HEADER = "privads-topic"

# what the workers consume, for lag reporting
CONSUMED_TOPICS = (IMPRESSIONS, CLICKS, REPARTITION)
# co-partitioned: same partition count, partition p of each is owned by one worker
EVENT_TOPICS = (IMPRESSIONS, CLICKS, REPARTITION)

CONTRACT_TOPICS = (IMPRESSIONS, CLICKS, ADS, DEAD_LETTER, MODEL_UPDATES)
ALL_TOPICS = CONTRACT_TOPICS + (REPARTITION,)
# topics whose order matters across the whole stream get one partition
SINGLE_PARTITION = (MODEL_UPDATES,)


def topic_partitions(partitions: int) -> dict[str, int]:
    """Partition count per topic for a deployment with ``partitions`` per source topic."""
    return {t: (1 if t in SINGLE_PARTITION else partitions) for t in ALL_TOPICS}


# --- records ----------------------------------------------------------------

UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Ts = Annotated[float, msgspec.Meta(ge=0)]


class Impression(msgspec.Struct, kw_only=True):
    event_id: NonEmpty
    ts: Ts
    user_id: UserId
    ad_id: NonEmpty
    position: Annotated[int, msgspec.Meta(ge=0)]
    propensity: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    policy: NonEmpty
    model_version: str | None = None
    request_id: NonEmpty
    context: dict[str, Any] | None = None
    # an extension of the contract's fields (extra fields are allowed): the served model's click probability
    # for this ad and user, before calibration; the ad's calibration factor compares its clicks with the sum
    pctr: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    # likewise: the ad's calibration factor the served policy multiplied in; the stream offsets the user's
    # learning step by its log (ranker.updates.learn_events), so that the update depends on the event alone
    factor: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # likewise: the user's own factor on the ad's category (ranker.scoring.user_factors), which ``factor``
    # includes; the stream counts the impression's expected clicks for the user's tastes as pctr · factor / it
    user_factor: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # likewise: what the ranker saw of the user when it served this impression, the features the learner trains
    # on (never the user's state at training time, which already holds this impression's own click): the
    # posterior mean as base64 of little-endian float16 (``pack_served``), and how many impressions it had learned
    user_mean: Annotated[str, msgspec.Meta(max_length=8192)] | None = None
    user_count: Annotated[int, msgspec.Meta(ge=0)] | None = None


def pack_served(mean: np.ndarray) -> str:
    """A user vector as logged with an impression: base64 of little-endian float16 (D = 64: 172 characters).

    Parameters
    ----------
    mean : ndarray, shape (D,)
    """
    return base64.b64encode(np.asarray(mean, "<f2").tobytes()).decode("ascii")


def unpack_served(text: str | None, d: int) -> np.ndarray | None:
    """``pack_served``'s inverse as float32, shape (d,); None when absent, malformed or of another dimension."""
    if not text:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    if len(raw) != 2 * d:
        return None
    v = np.frombuffer(raw, "<f2").astype(np.float32)
    return v if np.isfinite(v).all() else None


class Click(msgspec.Struct, kw_only=True):
    event_id: NonEmpty
    ts: Ts
    impression_id: NonEmpty
    user_id: UserId
    ad_id: NonEmpty
    value: Annotated[float, msgspec.Meta(ge=0)] | None = None


class Orphan(Click, kw_only=True):
    """A click kept while its impression has not arrived (``orph:{p}``), with where the worker read it.

    A click that turns out not to match its impression (another user's, or another ad's) is dead-lettered
    from there, with its original bytes. Orphans stored before these fields existed decode with them unset.
    """

    src_topic: str | None = None
    src_partition: int | None = None
    src_offset: int | None = None
    src_payload: bytes | None = None


def orphan(click: Click, topic: str, partition: int, offset: int, payload: bytes | None) -> Orphan:
    """``click`` as an ``Orphan`` read at (``topic``, ``partition``, ``offset``) as ``payload``."""
    fields = {name: getattr(click, name) for name in Click.__struct_fields__}
    return Orphan(**fields, src_topic=topic, src_partition=partition, src_offset=offset, src_payload=payload)


def click_only(click: Click) -> Click:
    """The contract's fields of a click (an ``Orphan`` without where it was read)."""
    if type(click) is Click:
        return click
    return Click(**{name: getattr(click, name) for name in Click.__struct_fields__})


class Ad(msgspec.Struct, kw_only=True):
    ad_id: NonEmpty
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    bid: Annotated[float, msgspec.Meta(ge=0)]
    category: str | None = None
    active: bool = True
    ts: Ts = 0.0


class Pending(msgspec.Struct, array_like=True):
    """What the workers keep of an impression while its attribution window is open."""

    user_id: str
    ad_id: str
    policy: str
    ts: float
    clicked: bool = False
    value: float = 0.0


class Labelled(msgspec.Struct, kw_only=True, array_like=True):
    """An impression whose outcome is known: clicked, or its window closed unclicked."""

    impression_id: str
    user_id: str
    ad_id: str
    ts: float
    clicked: bool
    policy: str
    value: float = 0.0


RECORDS: dict[str, type[msgspec.Struct]] = {IMPRESSIONS: Impression, CLICKS: Click, ADS: Ad}


def erased_event(erased: Mapping[str, float], who: str, ts: float) -> bool:
    """Whether an event at ``ts`` of a user (``who``: its id, or its hash where ``erased`` is keyed by hash)
    predates that user's erasure (``erased``: user → erased at). The one rule every copy of the data applies:
    the workers, the archive's drain and compaction, and the learner's and export's readers."""
    t = erased.get(who)
    return t is not None and ts <= t


def new_event_id() -> str:
    """A globally unique event id (random UUID), never derived from a seeded generator:
    seeded ids would repeat across restarts and replicas, and dedupe would drop real events."""
    return str(uuid.uuid4())


def new_event_ids(n: int) -> list[str]:
    """``n`` ids like ``new_event_id``'s (RFC 4122 version-4 UUID strings) from one read of the OS's randomness."""
    raw = bytearray(os.urandom(16 * n))
    for i in range(6, 16 * n, 16):
        raw[i] = (raw[i] & 0x0F) | 0x40  # version 4
        raw[i + 2] = (raw[i + 2] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return [f"{h[j:j + 8]}-{h[j + 8:j + 12]}-{h[j + 12:j + 16]}-{h[j + 16:j + 20]}-{h[j + 20:j + 32]}"
            for j in range(0, 32 * n, 32)]


@dataclass(frozen=True, slots=True)
class Decoded:
    record: Any
    extra: dict[str, Any]


_DECODERS = {topic: msgspec.json.Decoder(cls) for topic, cls in RECORDS.items()}
_FINITE = ("ts", "bid", "value", "propensity")


def decode_record(topic: str, payload: bytes | None) -> Any:
    """Decode and validate one message of a contract topic, fast (one typed pass; extra fields ignored).

    Raises
    ------
    InvalidEvent
        With a human-readable reason naming the field (the same as ``decode``'s).
    """
    if payload is None:
        raise InvalidEvent("empty message (null value)")
    try:
        record = _DECODERS[topic].decode(payload)
    except msgspec.MsgspecError:
        return decode(topic, payload).record  # the slow path words the error
    for name in _FINITE:
        v = getattr(record, name, None)
        if v is not None and not math.isfinite(v):
            raise InvalidEvent(f"`{name}` must be finite - at `$.{name}`")
    return record


def decode(topic: str, payload: bytes | None) -> Decoded:
    """Decode and validate one message of a contract topic, keeping its unknown fields in ``extra``.

    Raises
    ------
    InvalidEvent
        With a human-readable reason naming the field.
    """
    cls = RECORDS[topic]
    if payload is None:
        raise InvalidEvent("empty message (null value)")
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise InvalidEvent(f"not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(raw).__name__}")
    try:
        record = msgspec.convert(raw, cls)
    except msgspec.ValidationError as e:
        raise InvalidEvent(str(e)) from None
    for name in _FINITE:
        v = getattr(record, name, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidEvent(f"`{name}` must be finite - at `$.{name}`")
    known = cls.__struct_fields__
    return Decoded(record, {k: v for k, v in raw.items() if k not in known})


def encode(record: msgspec.Struct) -> bytes:
    return msgspec.json.encode(record)


def dead_letter(topic: str, partition: int, offset: int, error: str, payload: bytes | None) -> bytes:
    """The dead-letter record for a message that failed to decode or validate."""
    body: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset, "error": error}
    if payload is None:
        body.update(payload=None, payload_encoding=None)
    else:
        try:
            body.update(payload=payload.decode("utf-8"), payload_encoding="utf-8")
        except UnicodeDecodeError:
            body.update(payload=base64.b64encode(payload).decode("ascii"), payload_encoding="base64")
    return orjson.dumps(body)


_pending_encoder = msgspec.msgpack.Encoder()
_pending_decoder = msgspec.msgpack.Decoder(Pending)
_click_decoder = msgspec.msgpack.Decoder(Orphan)


def pack_pending(p: Pending) -> bytes:
    return _pending_encoder.encode(p)


def unpack_pending(blob: bytes) -> Pending:
    return _pending_decoder.decode(blob)


def pack_click(c: Click) -> bytes:
    return _pending_encoder.encode(c)


def unpack_click(blob: bytes) -> Orphan:
    return _click_decoder.decode(blob)
