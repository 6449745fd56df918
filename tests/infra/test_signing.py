"""Signed impression ids (``infra.signing``): a mac binds the id to its user and ad; nothing else verifies."""

from __future__ import annotations

import re
import secrets

import pytest

from privads.infra import signing
from privads.infra.records import new_event_ids

KEY = secrets.token_bytes(signing.SECRET_BYTES)


def test_an_id_verifies_for_its_user_and_ad_only() -> None:
    rid = new_event_ids(1)[0]
    iid = signing.sign(KEY, rid, "alice", "ad-1")
    assert re.fullmatch(rf"{rid}\.[A-Za-z0-9_-]{{{signing.MAC_CHARS}}}", iid) and len(iid) == 59
    assert signing.verify(KEY, iid, "alice", "ad-1")
    assert not signing.verify(KEY, iid, "mallory", "ad-1")  # another user's impression
    assert not signing.verify(KEY, iid, "alice", "ad-2")  # another ad
    assert not signing.verify(secrets.token_bytes(32), iid, "alice", "ad-1")  # another server's secret
    # its random id with another mac, or the mac under another random id
    mac = iid.rsplit(".", 1)[1]
    assert not signing.verify(KEY, f"{new_event_ids(1)[0]}.{mac}", "alice", "ad-1")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    assert not signing.verify(KEY, f"{rid}.{flipped}", "alice", "ad-1")


@pytest.mark.parametrize("made_up", ["i", "", ".", "abc.", ".abcdefghijklmnopqrstuv", "x" * 59,
                                     "0" * 36 + "." + "A" * 22, "0" * 36 + "." + "é" * 22,
                                     "0" * 36 + "." + "A" * 21, "0" * 36 + "." + "A" * 23])
def test_made_up_ids_never_verify_and_never_raise(made_up: str) -> None:
    assert not signing.verify(KEY, made_up, "alice", "ad-1")


def test_the_signed_message_keeps_its_parts_apart() -> None:
    # without the lengths, ("a", "b.c") and ("a.b", "c") would be the same bytes
    assert signing.mac(KEY, "r", "a", "b.c") != signing.mac(KEY, "r", "a.b", "c")
    assert signing.mac(KEY, "r.a", "b", "c") != signing.mac(KEY, "r", "a.b", "c")
    assert signing.mac(KEY, "r", "ab", "") != signing.mac(KEY, "r", "a", "b")


def test_any_id_the_api_accepts_signs_and_verifies() -> None:
    for user, ad in [("a/b", "x"), ("ü" * 128, "ad with spaces"), ("\ud800", "lone surrogate"), (".", ".")]:
        iid = signing.sign(KEY, "r", user, ad)
        assert signing.verify(KEY, iid, user, ad)


def test_sign_many_signs_each_ad_of_one_request() -> None:
    rids = new_event_ids(3)
    ids = signing.sign_many(KEY, "bob", rids, ["a1", "a2", "a3"])
    assert [signing.verify(KEY, i, "bob", a) for i, a in zip(ids, ["a1", "a2", "a3"], strict=True)] == [True] * 3
    assert not signing.verify(KEY, ids[0], "bob", "a2")  # not interchangeable between the ads of one answer
    with pytest.raises(ValueError):
        signing.sign_many(KEY, "bob", rids, ["a1"])
