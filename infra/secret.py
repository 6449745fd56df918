"""The server secret that signs impression ids (``infra.signing``), kept in Redis.

Created once, by whichever API process starts first, from the operating
system's entropy (``secrets.token_bytes``), with ``SET NX`` so that concurrent
starts agree on one value; every API process reads it at start-up and keeps it
in memory (no Redis round trip per request). It lives as long as the Redis data
(AOF): clicks on impressions served before an API restart still verify. If it
is lost (Redis emptied), the next start creates a new one and clicks on
impressions served before are refused; so is every user state with it.
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis, RedisCluster

from privads.infra.errors import Unavailable
from privads.infra.signing import SECRET_BYTES

IMPRESSION_SECRET = "secret:impressions"


async def impression_secret(r: Redis | RedisCluster) -> bytes:
    """The impression-signing secret: the one in Redis, created there first if there is none.

    Parameters
    ----------
    r : redis.asyncio.Redis

    Raises
    ------
    Unavailable
        If the stored value is not a secret of ``SECRET_BYTES`` or more (written by something else).
    """
    await r.set(IMPRESSION_SECRET, secrets.token_bytes(SECRET_BYTES), nx=True)
    value = await r.get(IMPRESSION_SECRET)
    if not isinstance(value, bytes) or len(value) < SECRET_BYTES:
        raise Unavailable(f"Redis key {IMPRESSION_SECRET!r} does not hold a secret of {SECRET_BYTES} bytes; "
                          "delete it and restart the API to create one")
    return value
