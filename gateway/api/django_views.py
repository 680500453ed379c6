"""Django-served endpoints: readiness, operator status, and OpenAI-shaped error pages."""

from __future__ import annotations

import time

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from ..errors import GatewayError, not_found_error


def _error_response(exc: GatewayError) -> JsonResponse:
    response = JsonResponse(exc.to_dict(), status=exc.status)
    for key, value in exc.headers.items():
        response[key] = value
    return response


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/v1/") or request.path == "/v1"


def handler404(request, exception=None):
    if _is_api(request) or "application/json" in request.headers.get("accept", ""):
        return _error_response(not_found_error(request.path))
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request):
    if _is_api(request):
        return _error_response(GatewayError(500, "The platform hit an internal error; it has been logged.", code="internal_error"))
    from django.views.defaults import server_error

    return server_error(request)


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return None
    except Exception as exc:
        return type(exc).__name__


def _check_redis() -> str | None:
    from llm_platform.redis import get_redis

    try:
        get_redis().ping()
        return None
    except Exception as exc:
        return type(exc).__name__


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _database_ready() -> str | None:
    """Through llm_platform.db.orm, as the hot path reads: a fresh connection after a restart,
    and an answer within DATABASE_CALL_TIMEOUT when PostgreSQL hangs."""
    from llm_platform.db import DatabaseUnavailable, orm

    try:
        await orm(_select_one)
        return None
    except DatabaseUnavailable as exc:
        return exc.message


async def _redis_ready() -> str | None:
    from llm_platform.redis import get_async_redis

    try:
        await get_async_redis().ping()
        return None
    except Exception as exc:  # noqa: BLE001 - reported, not raised: /ready must answer
        return type(exc).__name__


@require_GET
async def ready(request: HttpRequest) -> JsonResponse:
    """PostgreSQL and Redis reachable; load balancers take us out of rotation on 503."""
    checks = {"postgres": await _database_ready(), "redis": await _redis_ready()}
    ok = all(v is None for v in checks.values())
    body = {"status": "ready" if ok else "unavailable",
            "checks": {k: "ok" if v is None else f"error: {v}" for k, v in checks.items()}}
    response = JsonResponse(body, status=200 if ok else 503)
    if not ok:
        response["Retry-After"] = "5"
    return response


def _operator(request: HttpRequest) -> bool:
    token = settings.GATEWAY["STATUS_TOKEN"]
    if token and request.headers.get("authorization") == f"Bearer {token}":
        return True
    user = getattr(request, "user", None)
    return bool(user and user.is_authenticated and user.is_staff)


def _usage_backlog() -> dict:
    """Usage rows not yet in PostgreSQL: in the Redis stream, dead-lettered, spooled on disk."""
    from billing.recorder import spooled_files, stream_name
    from billing.writer import DEAD_LETTER
    from llm_platform.redis import get_redis

    out: dict = {"spooled_files": spooled_files()}
    try:
        client = get_redis()
        out["in_stream"] = client.xlen(stream_name())
        out["dead_letters"] = client.xlen(DEAD_LETTER)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: /status must answer
        out["error"] = type(exc).__name__
    return out


@require_GET
def status(request: HttpRequest) -> JsonResponse:
    """Per-lane configuration and reachability, for operators (staff session or status token)."""
    if not _operator(request):
        return _error_response(GatewayError(403, "The status page is for operators: log in to admin or send the status token.", code="forbidden"))
    from gateway.status import lane_status

    started = time.perf_counter()
    lanes = lane_status()
    return JsonResponse({
        "postgres": _check_database() or "ok",
        "redis": _check_redis() or "ok",
        "usage": _usage_backlog(),
        "lanes": lanes,
        "took_ms": round((time.perf_counter() - started) * 1000, 1),
    })
