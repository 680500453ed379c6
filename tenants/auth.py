"""API key -> Principal, through a per-process cache over a shared Redis cache.

PostgreSQL is queried only on a miss in both. Any change to a key, its tenant or its tier deletes
the Redis entry (signals.py); processes' own copies live `LOCAL_CACHE_SECONDS`, so a revoke
reaches every process within that time.
"""

from __future__ import annotations

import re
import time

import orjson
from django.conf import settings

from llm_platform.redis import get_async_redis

from .models import KEY_PREFIX, ApiKey, hash_key
from .principal import Principal

_KEY_SHAPE = re.compile(r"^[A-Za-z0-9_\-]{20,200}$")
_NEGATIVE = b"-"
_local: dict[str, tuple[float, Principal | None]] = {}
_LOCAL_MAX = 100_000


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
    client = get_async_redis()
    cached = await client.get(redis_key(hashed))
    if cached is not None:
        return None if cached == _NEGATIVE else Principal.from_dict(orjson.loads(cached))
    from asgiref.sync import sync_to_async

    principal = await sync_to_async(_load_from_db, thread_sensitive=False)(hashed)
    ttl = settings.GATEWAY["REDIS_CACHE_SECONDS"]
    if principal is None:
        await client.set(redis_key(hashed), _NEGATIVE, ex=min(ttl, 30))
    else:
        await client.set(redis_key(hashed), orjson.dumps(principal.to_dict()), ex=ttl)
    return principal


async def authenticate(raw_key: str) -> Principal:
    """Resolve a key to its principal or raise AuthenticationFailed (revoked, expired, unknown)."""
    if not raw_key.startswith(KEY_PREFIX):
        raise AuthenticationFailed("Incorrect API key provided.")
    hashed = hash_key(raw_key)
    now = time.monotonic()
    entry = _local.get(hashed)
    if entry is not None and entry[0] > now:
        principal = entry[1]
    else:
        principal = await _resolve(hashed)
        if len(_local) >= _LOCAL_MAX:
            _local.clear()
        _local[hashed] = (now + settings.GATEWAY["LOCAL_CACHE_SECONDS"], principal)
    if principal is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    if principal.expires_at is not None and principal.expires_at <= time.time():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    return principal


def forget_local() -> None:
    """Drop this process's copies (tests; a management command changing many keys)."""
    _local.clear()
