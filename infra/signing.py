"""Signed impression ids: a click names an impression the API really served to that user and ad. Pure (no I/O).

The ids ``POST /recommend`` hands out are ``<random id>.<mac>``: the random id
is a version-4 UUID (``records.new_event_ids``), and the mac is HMAC-SHA256
under a server secret (``infra.secret``), truncated to ``MAC_BYTES`` and
base64url-encoded without padding, over the random id, the user id and the ad
id. The impression's ``event_id`` is the whole signed id, so a click joins its
impression by it as before; ``POST /clicks`` recomputes the mac from the
click's own ``user_id`` and ``ad_id`` and refuses a click whose id does not
carry it: an id made up, another user's, or one served with another ad.

Truncation to 16 bytes keeps the id short (59 characters) and leaves a forger
one chance in 2^128 per guess. Signing costs about 2 µs per ad (one HMAC over
well under one block of SHA-256 input), off any I/O.
"""

from __future__ import annotations

import base64
import hmac
import struct
from collections.abc import Sequence

MAC_BYTES = 16
MAC_CHARS = 22  # base64url of MAC_BYTES, without its two padding characters
SECRET_BYTES = 32
SEPARATOR = "."
# a version tag in every signed message: a later format cannot be confused with this one
_DOMAIN = b"privads-impression-v1"
_LENGTHS = struct.Struct(">III")


def _message(random_id: str, user_id: str, ad_id: str) -> bytes:
    # the three lengths first: user and ad ids may hold any character, so no separator could keep ("a", "b.c")
    # and ("a.b", "c") apart; surrogatepass: JSON may carry a lone surrogate, which must sign like any other
    # character rather than fail
    r, u, a = (p.encode("utf-8", "surrogatepass") for p in (random_id, user_id, ad_id))
    return _DOMAIN + _LENGTHS.pack(len(r), len(u), len(a)) + r + u + a


def mac(secret: bytes, random_id: str, user_id: str, ad_id: str) -> str:
    """The mac of one impression: base64url, ``MAC_CHARS`` characters.

    Parameters
    ----------
    secret : bytes
        The server secret (``SECRET_BYTES`` random bytes).
    random_id, user_id, ad_id : str
        What the impression binds: its random id, the user it was served to, the ad it showed.
    """
    digest = hmac.digest(secret, _message(random_id, user_id, ad_id), "sha256")
    return base64.urlsafe_b64encode(digest[:MAC_BYTES])[:MAC_CHARS].decode("ascii")


def sign(secret: bytes, random_id: str, user_id: str, ad_id: str) -> str:
    """The signed impression id ``<random id>.<mac>``."""
    return f"{random_id}{SEPARATOR}{mac(secret, random_id, user_id, ad_id)}"


def sign_many(secret: bytes, user_id: str, random_ids: Sequence[str], ad_ids: Sequence[str]) -> list[str]:
    """Signed ids of one request's impressions: one user, ``random_ids[i]`` showing ``ad_ids[i]``."""
    return [sign(secret, r, user_id, a) for r, a in zip(random_ids, ad_ids, strict=True)]


def verify(secret: bytes, impression_id: str, user_id: str, ad_id: str) -> bool:
    """Whether ``impression_id`` was signed for this user and ad under ``secret``.

    False for anything else: an unsigned or malformed id, another user's
    impression, another ad's. The comparison takes the same time wherever the
    macs differ.
    """
    random_id, sep, got = impression_id.rpartition(SEPARATOR)
    if not sep or not random_id or len(got) != MAC_CHARS:
        return False
    want = mac(secret, random_id, user_id, ad_id)
    return hmac.compare_digest(got.encode("utf-8", "surrogatepass"), want.encode("ascii"))
