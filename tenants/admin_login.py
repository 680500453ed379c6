"""Django admin's login view behind a per-IP limit on POSTs, so passwords cannot be guessed fast.

django-ratelimit counts every POST to /admin/login/ per client address in Redis (shared by all
processes); past `RATELIMIT_ADMIN_LOGIN_RATE` (env `GW_ADMIN_LOGIN_RATE`, default 5/m) the
client gets 429 with `Retry-After` until the window ends, whatever the password. GETs (showing
the form) are never limited. A successful login is a POST too, so it counts; an admin who has
logged in has a session and does not come back here.
"""

from __future__ import annotations

import logging
import re

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.utils.cache import add_never_cache_headers
from django.utils.html import escape
from django_ratelimit.core import get_usage
from django_ratelimit.decorators import ratelimit
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

GROUP = "gw.admin-login"
_RATE_SHAPE = re.compile(r"\d+/\d*[smhd]")
_REACHED = "_gw_admin_login_reached"


def login_rate(group: str | None = None, request: HttpRequest | None = None) -> str:
    """The configured rate, read per request (tests override it) and checked strictly.

    django-ratelimit reads "5/minute" as 5 per *second*; refuse anything but N/[M](s|m|h|d).
    """
    rate = getattr(settings, "RATELIMIT_ADMIN_LOGIN_RATE", "5/m")
    if not isinstance(rate, str) or not _RATE_SHAPE.fullmatch(rate):
        raise ImproperlyConfigured(
            f"GW_ADMIN_LOGIN_RATE must look like 5/m or 20/15m (s, m, h, d), not {rate!r}"
        )
    return rate


def _too_many(request: HttpRequest) -> HttpResponse:
    usage = get_usage(
        request, group=GROUP, key="ip", rate=login_rate(), method="POST", increment=False
    )
    retry_after = max(1, usage["time_left"]) if usage and usage["time_left"] > 0 else 60
    log.warning("admin login rate limit reached", extra={"client": request.META.get("REMOTE_ADDR")})
    return _page(
        429,
        "Too many login attempts",
        f"Too many login attempts from your address. Try again in {retry_after} seconds.",
        retry_after,
    )


def _page(status: int, title: str, text: str, retry_after: int) -> HttpResponse:
    body = (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
        f"</head><body><h1>{escape(title)}</h1><p>{escape(text)}</p></body></html>"
    )
    response = HttpResponse(body, status=status, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(retry_after)
    add_never_cache_headers(response)
    return response


@ratelimit(group=GROUP, key="ip", rate=login_rate, method="POST", block=False)
def _counted_login(request: HttpRequest) -> HttpResponse:
    if getattr(request, "limited", False):
        return _too_many(request)
    setattr(request, _REACHED, True)
    return admin.site.login(request)


@login_not_required
def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin login view, counted per client IP; 429 past the rate.

    Redis down: the counter cannot be kept. By default (RATELIMIT_FAIL_OPEN off) the login
    answers 503 rather than allowing unlimited guesses; with it on, logins go through unlimited.
    """
    try:
        return _counted_login(request)
    except RedisError:
        if getattr(request, _REACHED, False):
            raise  # the login view itself failed; not ours to hide
        if getattr(settings, "RATELIMIT_FAIL_OPEN", False):
            log.warning("admin login rate limit skipped: Redis unavailable", exc_info=True)
            return admin.site.login(request)
        log.error("admin login refused: Redis unavailable for the rate limit", exc_info=True)
        return _page(
            503, "Login unavailable", "Login is briefly unavailable. Try again shortly.", 30
        )
