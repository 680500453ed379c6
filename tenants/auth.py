"""API key -> Principal, through a per-process cache over a shared Redis cache.

PostgreSQL is queried only on a miss in both. Any change to a key, its tenant or its tier deletes
the Redis entry (signals.py); processes' own copies live `LOCAL_CACHE_SECONDS`, so a revoke
reaches every process within that time.

A process reads a key once per refresh however many requests carry it (single flight): the
first request past two thirds of the entry's life starts a refresh in the background and every
request keeps the value it has until the refresh lands; past its life, requests wait for the one
refresh in flight. While PostgreSQL is away, an entry this process already holds keeps serving
for up to `DATABASE_STALE_SECONDS`; a key it never saw gets 503 `database_unavailable`. A key
whose checksum is wrong never reaches Redis or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from functools import partial

import orjson
from django.conf import settings

from llm_platform.db import DatabaseUnavailable, orm
from llm_platform.redis import get_async_redis

from .models import KEY_PREFIX, ApiKey, hash_key, key_is_plausible
from .principal import Principal

_KEY_SHAPE = re.compile(r"^[A-Za-z0-9_\-]{20,200}$")
_NEGATIVE = b"-"
_LOCAL_MAX = 100_000
REFRESH_AHEAD = 2 / 3  # of an entry's life: the first request after that refreshes it
clock = time.monotonic  # tests move it


@dataclass(slots=True)
class _Entry:
    principal: Principal | None
    loaded_at: float
    refresh_at: float
    fresh_until: float


_local: dict[str, _Entry] = {}
_inflight: dict[str, asyncio.Future] = {}
stats = {"lookups": 0}  # shared-cache lookups this process made (Redis, then PostgreSQL on a miss)


class AuthenticationFailed(Exception):
    """The caller is not who they claim; `reason` is safe to show them."""

    def __init__(self, reason: str, code: str = "invalid_api_key") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def redis_key(hashed: str) -> str:
    return f"gw:key:{hashed}"


def extract_key(authorization: str | None, x_api_key: str | None) -> str:
    """The key from `Authorization: Bearer` or `x-api-key` (the Anthropic SDK's header)."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationFailed(
                "Malformed Authorization header; expected 'Bearer <api key>'."
            )
        key = value.strip()
    elif x_api_key:
        key = x_api_key.strip()
    else:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <api key>'.",
            code="missing_api_key",
        )
    if not _KEY_SHAPE.match(key):
        raise AuthenticationFailed("Malformed API key.")
    return key


def _load_from_db(hashed: str) -> Principal | None:
    key = ApiKey.objects.select_related("tenant__tier").filter(hashed_key=hashed).first()
    if key is None or not key.tenant.is_active or key.revoked_at is not None:
        return None
    return Principal.from_key(key)


async def _resolve(hashed: str) -> Principal | None:
    stats["lookups"] += 1
    client = get_async_redis()
    cached = await client.get(redis_key(hashed))
    if cached is not None:
        return None if cached == _NEGATIVE else Principal.from_dict(orjson.loads(cached))
    principal = await orm(_load_from_db, hashed)
    ttl = settings.GATEWAY["REDIS_CACHE_SECONDS"]
    if principal is None:
        await client.set(redis_key(hashed), _NEGATIVE, ex=min(ttl, 30))
    else:
        await client.set(redis_key(hashed), orjson.dumps(principal.to_dict()), ex=ttl)
    return principal


async def _load(hashed: str) -> Principal | None:
    principal = await _resolve(hashed)
    if len(_local) >= _LOCAL_MAX:
        _local.clear()
    now, life = clock(), settings.GATEWAY["LOCAL_CACHE_SECONDS"]
    _local[hashed] = _Entry(principal, now, now + life * REFRESH_AHEAD, now + life)
    return principal


def _done(hashed: str, future: asyncio.Future) -> None:
    if _inflight.get(hashed) is future:
        del _inflight[hashed]
    if not future.cancelled():
        future.exception()  # a background refresh's failure: the next request tries again


def _refresh(hashed: str) -> asyncio.Future:
    """The refresh in flight for this key, or a new one: one lookup however many ask."""
    future = _inflight.get(hashed)
    if future is None or future.get_loop() is not asyncio.get_running_loop():
        future = asyncio.ensure_future(_load(hashed))
        _inflight[hashed] = future
        future.add_done_callback(partial(_done, hashed))
    return future


async def _principal(hashed: str) -> Principal | None:
    now = clock()
    entry = _local.get(hashed)
    if entry is not None and now < entry.fresh_until:
        if now >= entry.refresh_at:
            _refresh(hashed)  # ahead of expiry; this request keeps the value it has
        return entry.principal
    try:
        # shield: a caller that leaves (client hang-up) does not cancel the others' lookup
        return await asyncio.shield(_refresh(hashed))
    except DatabaseUnavailable:
        stale_until = entry.loaded_at + settings.DATABASE_STALE_SECONDS if entry is not None else 0.0
        if now >= stale_until:
            raise
        # PostgreSQL away: what this process knew still holds. The next requests serve it at
        # once, and one at a time tries again in the background.
        entry.refresh_at = now
        entry.fresh_until = min(now + settings.GATEWAY["LOCAL_CACHE_SECONDS"], stale_until)
        return entry.principal


async def authenticate(raw_key: str) -> Principal:
    """Resolve a key to its principal or raise AuthenticationFailed (revoked, expired, unknown).

    Raises DatabaseUnavailable (a GatewayError: 503) when the key must be read from a
    PostgreSQL that is away, and redis errors when the shared cache is."""
    if not raw_key.startswith(KEY_PREFIX):
        raise AuthenticationFailed("Incorrect API key provided.")
    hashed = hash_key(raw_key)
    # The checksum spares PostgreSQL a made-up key; a key this process holds is known already.
    if hashed not in _local and not key_is_plausible(raw_key):
        raise AuthenticationFailed("Incorrect API key provided.")
    principal = await _principal(hashed)
    if principal is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    if principal.expires_at is not None and principal.expires_at <= time.time():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    return principal


def forget_local() -> None:
    """Drop this process's copies (tests; a management command changing many keys)."""
    _local.clear()
    _inflight.clear()
