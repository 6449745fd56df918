"""Unit tests for topic records, strict decoding and dead letters (``infra.records``)."""

from __future__ import annotations

import base64
import json

import pytest

from privads.infra import records
from privads.infra.errors import InvalidEvent
from privads.infra.records import (
    ADS,
    CLICKS,
    IMPRESSIONS,
    MODEL_UPDATES,
    Ad,
    Click,
    Impression,
    Pending,
    dead_letter,
    decode,
    decode_record,
    encode,
    pack_click,
    pack_pending,
    topic_partitions,
    unpack_click,
    unpack_pending,
)


def _impression(**over) -> dict:
    body = {"event_id": "e1", "ts": 1700000000.5, "user_id": "u1", "ad_id": "a1", "position": 0,
            "propensity": 0.25, "policy": "thompson", "model_version": "v1", "request_id": "r1"}
    body.update(over)
    return body


def _click(**over) -> dict:
    body = {"event_id": "c1", "ts": 1700000001.0, "impression_id": "e1", "user_id": "u1", "ad_id": "a1"}
    body.update(over)
    return body


def _ad(**over) -> dict:
    body = {"ad_id": "a1", "text": "running shoes", "bid": 0.5, "category": "sport"}
    body.update(over)
    return body


def _bytes(d) -> bytes:
    return json.dumps(d).encode()


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# --- valid messages -------------------------------------------------------------


def test_decode_valid_impression():
    dec = decode(IMPRESSIONS, _bytes(_impression()))
    r = dec.record
    assert isinstance(r, Impression)
    assert (r.event_id, r.user_id, r.ad_id, r.position, r.policy, r.request_id) == (
        "e1", "u1", "a1", 0, "thompson", "r1")
    assert r.ts == 1700000000.5 and r.propensity == 0.25 and r.model_version == "v1"
    assert dec.extra == {}


def test_decode_impression_optional_fields_default_to_none():
    body = _drop(_drop(_drop(_impression(), "propensity"), "model_version"), "context")
    r = decode(IMPRESSIONS, _bytes(body)).record
    assert r.propensity is None and r.model_version is None and r.context is None
    assert decode(IMPRESSIONS, _bytes(_impression(propensity=None))).record.propensity is None


def test_decode_accepts_ints_for_floats():
    # ts, propensity (1 is the inclusive upper bound), value and bid given as JSON integers
    r = decode(IMPRESSIONS, _bytes(_impression(ts=1700000000, propensity=1))).record
    assert r.ts == 1700000000.0 and isinstance(r.ts, float)
    assert r.propensity == 1.0 and isinstance(r.propensity, float)
    c = decode(CLICKS, _bytes(_click(ts=5, value=2))).record
    assert isinstance(c, Click) and c.ts == 5.0 and c.value == 2.0 and isinstance(c.value, float)
    a = decode(ADS, _bytes(_ad(bid=3))).record
    assert isinstance(a, Ad) and a.bid == 3.0 and isinstance(a.bid, float)


def test_decode_valid_click_and_ad_defaults():
    c = decode(CLICKS, _bytes(_click())).record
    assert (c.event_id, c.impression_id, c.user_id, c.ad_id, c.value) == ("c1", "e1", "u1", "a1", None)
    a = decode(ADS, _bytes(_drop(_ad(), "category"))).record
    assert a.active is True and a.ts == 0.0 and a.category is None
    a = decode(ADS, _bytes(_ad(active=False, ts=12.5))).record
    assert a.active is False and a.ts == 12.5 and a.category == "sport"


def test_unknown_extra_fields_are_kept():
    extra = {"campaign": {"id": 7, "tags": ["x"]}, "note": None, "score": 1.5}
    dec = decode(IMPRESSIONS, _bytes(_impression(**extra)))
    assert dec.extra == extra
    assert dec.record.user_id == "u1"
    dec = decode(ADS, _bytes(_ad(foo="bar")))
    assert dec.extra == {"foo": "bar"}


def test_user_id_boundary_128_chars_is_valid():
    assert decode(IMPRESSIONS, _bytes(_impression(user_id="x" * 128))).record.user_id == "x" * 128


# --- rejected messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "needle"),
    [
        (IMPRESSIONS, b"{not json", "not JSON"),
        (IMPRESSIONS, b"", "not JSON"),
        (IMPRESSIONS, _bytes([_impression()]), "JSON object"),
        (IMPRESSIONS, b'"a string"', "JSON object"),
        (IMPRESSIONS, _bytes(_drop(_impression(), "user_id")), "user_id"),
        (IMPRESSIONS, _bytes(_impression(user_id="")), "user_id"),
        (IMPRESSIONS, _bytes(_impression(user_id="x" * 129)), "user_id"),
        (IMPRESSIONS, _bytes(_impression(position=-1)), "position"),
        (IMPRESSIONS, _bytes(_impression(position=1.5)), "position"),
        (IMPRESSIONS, _bytes(_impression(propensity=0)), "propensity"),
        (IMPRESSIONS, _bytes(_impression(propensity=1.5)), "propensity"),
        (IMPRESSIONS, _bytes(_impression(ts=-1)), "ts"),
        (IMPRESSIONS, _bytes(_impression(ts="1700000000")), "ts"),
        (CLICKS, _bytes(_drop(_click(), "impression_id")), "impression_id"),
        (CLICKS, _bytes(_click(value=-0.5)), "value"),
        (ADS, _bytes(_ad(bid=-1)), "bid"),
        (ADS, _bytes(_ad(text="")), "text"),
        (ADS, _bytes(_drop(_ad(), "bid")), "bid"),
    ],
)
def test_decode_rejects_with_reason_naming_the_field(topic, payload, needle):
    with pytest.raises(InvalidEvent) as err:
        decode(topic, payload)
    assert needle in str(err.value)


def test_nan_ts_is_not_json():
    # orjson follows RFC 8259 strictly: NaN / Infinity / 1e400 are not JSON, so they never reach validation
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        payload = b'{"event_id":"e1","ts":' + literal + b',"user_id":"u","ad_id":"a","position":0,' \
                  b'"policy":"p","request_id":"r"}'
        with pytest.raises(InvalidEvent, match="not JSON"):
            decode(IMPRESSIONS, payload)


def test_null_payload_rejected():
    with pytest.raises(InvalidEvent, match="null"):
        decode(IMPRESSIONS, None)


def test_invalid_event_is_a_value_error():
    assert issubclass(InvalidEvent, ValueError)


# --- dead letters -------------------------------------------------------------------


def test_dead_letter_utf8_payload():
    payload = '{"user_id": "é", broken'.encode()
    body = json.loads(dead_letter(IMPRESSIONS, 3, 42, "not JSON: boom", payload))
    assert body == {"topic": IMPRESSIONS, "partition": 3, "offset": 42, "error": "not JSON: boom",
                    "payload": '{"user_id": "é", broken', "payload_encoding": "utf-8"}
    assert body["payload"].encode("utf-8") == payload


def test_dead_letter_base64_for_invalid_utf8_round_trips():
    payload = b"\xff\xfe\x00binary\x80"
    body = json.loads(dead_letter(CLICKS, 0, 7, "not JSON", payload))
    assert body["payload_encoding"] == "base64"
    assert base64.b64decode(body["payload"], validate=True) == payload
    assert (body["topic"], body["partition"], body["offset"]) == (CLICKS, 0, 7)


def test_dead_letter_null_payload():
    body = json.loads(dead_letter(ADS, 1, 2, "empty message (null value)", None))
    assert body["payload"] is None and body["payload_encoding"] is None


# --- topics and internal records --------------------------------------------------------


def test_topic_partitions():
    parts = topic_partitions(8)
    assert set(parts) == set(records.ALL_TOPICS)
    assert parts[MODEL_UPDATES] == 1
    assert all(n == 8 for t, n in parts.items() if t != MODEL_UPDATES)
    assert topic_partitions(1)[MODEL_UPDATES] == 1
    assert set(records.CONTRACT_TOPICS) <= set(records.ALL_TOPICS)


# the compact records the workers keep in Redis round-trip exactly
def test_pending_and_click_pack_round_trip():
    pend = Pending(user_id="u1", ad_id="a1", policy="treatment", ts=12.5, clicked=True, value=1.25)
    assert unpack_pending(pack_pending(pend)) == pend
    assert len(pack_pending(pend)) < 40  # msgpack array: no field names stored per impression
    c = decode(CLICKS, _bytes(_click())).record
    assert records.click_only(unpack_click(pack_click(c))) == c  # unpacked as an Orphan: a Click, and its source


def test_encode_record_then_decode_is_identity():
    r = decode(IMPRESSIONS, _bytes(_impression())).record
    assert decode(IMPRESSIONS, encode(r)).record == r


# the workers' fast typed decoder accepts exactly what decode accepts, and words errors the same
@pytest.mark.parametrize("payload", [
    _bytes(_impression()), _bytes(_impression(extra_field={"kept": True})), b"{not json", b"[1, 2]", b"null",
    _bytes(_impression(user_id="")), _bytes(_impression(propensity=0)), _bytes(_impression(position=-1)),
    b'{"event_id":"e","ts":1e400,"user_id":"u","ad_id":"a","position":0,"policy":"p","request_id":"r"}',
])
def test_decode_record_agrees_with_decode(payload):
    try:
        slow = decode(IMPRESSIONS, payload).record
    except InvalidEvent as e:
        with pytest.raises(InvalidEvent) as fast:
            decode_record(IMPRESSIONS, payload)
        assert str(fast.value) == str(e)
    else:
        assert decode_record(IMPRESSIONS, payload) == slow


def test_new_event_ids_are_distinct_version_4_uuids() -> None:
    import uuid

    ids = records.new_event_ids(500)
    assert len(set(ids)) == 500
    for s in ids:
        u = uuid.UUID(s)
        assert str(u) == s and u.version == 4 and u.variant == uuid.RFC_4122
    assert records.new_event_ids(0) == []


def test_an_orphan_keeps_where_its_click_was_read_and_old_orphans_still_decode() -> None:
    c = Click(event_id="c1", ts=2.0, impression_id="i1", user_id="u1", ad_id="a1", value=0.5)
    raw = encode(c)
    back = unpack_click(pack_click(records.orphan(c, CLICKS, 3, 42, raw)))
    assert (back.src_topic, back.src_partition, back.src_offset, back.src_payload) == (CLICKS, 3, 42, raw)
    assert records.click_only(back) == c and type(records.click_only(back)) is Click
    old = unpack_click(pack_click(c))  # stored before orphans kept their source
    assert records.click_only(old) == c and old.src_topic is None and old.src_payload is None
