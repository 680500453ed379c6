"""What every HTTP front door shares: who is calling, and what happens when they hang up."""

from __future__ import annotations

import redis.exceptions
from asgiref.sync import sync_to_async
from django.conf import settings

from tenants.auth import AuthenticationFailed, authenticate, extract_key
from tenants.principal import Principal

from ..api.http import Request
from ..chat.cancel import CLIENT_GONE, CancelToken, run_cancellable
from ..errors import GatewayError


async def principal_of(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer` or `x-api-key`; 401 (429 when an address keeps
    sending bad keys) or 503 when the key store is unreachable."""
    try:
        key = extract_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        return await authenticate(key)
    except AuthenticationFailed as exc:
        await _count_bad_key(request.client_ip)
        raise GatewayError(401, exc.reason, code=exc.code) from None
    except (redis.exceptions.RedisError, OSError):
        raise GatewayError(503, "The platform's key store is unreachable; retry shortly.", type="server_error",
                           code="auth_unavailable", headers={"Retry-After": "2"}) from None


def _bad_key_usage(ip: str) -> dict | None:
    from django_ratelimit.core import get_usage

    return get_usage(_AddressOnly, group="gw.bad-keys", key=lambda group, request: ip,
                     rate=settings.GATEWAY["BAD_KEY_RATE"], increment=True)


class _AddressOnly:
    """django-ratelimit only needs a method here: the key is the caller's address."""

    method = "POST"


async def _count_bad_key(ip: str) -> None:
    """Failed authentications per address, counted by django-ratelimit; too many get 429."""
    try:
        usage = await sync_to_async(_bad_key_usage, thread_sensitive=False)(ip)
    except Exception:  # the counter store is down: answer the 401 anyway
        return
    if usage and usage["should_limit"]:
        raise GatewayError(429, "Too many requests with invalid API keys from your address; slow down.",
                           type="rate_limit_error", code="too_many_invalid_keys",
                           headers={"Retry-After": str(max(1, usage["time_left"]))})


class ClientSink:
    """`send` that remembers a client who left; a resumable stream keeps producing after that."""

    __slots__ = ("_send", "gone")

    def __init__(self, send) -> None:
        self._send = send
        self.gone = False

    async def __call__(self, message) -> None:
        if self.gone:
            return
        try:
            await self._send(message)
        except OSError:
            self.gone = True


def until_disconnect(work, receive, token: CancelToken, detach: ClientSink | None = None):
    """Run a door's rendering of a session (await the result); if the client hangs up first,
    cancel the call through its token (the upstream call stops, the slot is released, the row
    is partial). With `detach` (a resumable stream) the call goes on and only stops sending."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if detach is not None:
            detach.gone = True
        else:
            token.cancel(CLIENT_GONE)

    return run_cancellable(token, work, alongside=watch())


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")
