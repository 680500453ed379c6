"""Admin login: password guessing from one address is answered 429 after a few POSTs."""

from __future__ import annotations

import http.cookiejar
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, RequestFactory, override_settings
from django_ratelimit.core import get_usage

from tenants.admin_login import GROUP, login_rate

PASSWORD = "right-password-123"


def window_left(ip: str) -> int:
    """Seconds until this address's counting window ends (windows are per address)."""
    request = RequestFactory().post("/admin/login/", REMOTE_ADDR=ip)
    usage = get_usage(request, group=GROUP, key="ip", rate=login_rate(), method="POST")
    return usage["time_left"]


def random_ip() -> str:
    """A random 10.x address: only a REMOTE_ADDR value, no traffic goes there."""
    return f"10.{random.randint(0, 255)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def fresh_ip() -> str:
    """A random address whose counting window will not roll over in the middle of a test."""
    while True:
        ip = random_ip()
        if window_left(ip) >= 15:
            return ip


@pytest.fixture()
def ratelimit_keys(flushed_redis):
    """Remove this run's counters afterwards (they live in the shared Redis cache)."""
    yield
    for key in flushed_redis.scan_iter(match="gw:cache:*rl:*"):
        flushed_redis.delete(key)


@pytest.fixture()
def admin_user(db, settings):
    from django.contrib.auth.models import User

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast, test only

    return User.objects.create_superuser("ratelimit-admin", "r@example.com", PASSWORD)


def attempt(client: Client, ip: str, password: str = "wrong-password"):
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": "ratelimit-admin", "password": password, "next": "/admin/"},
        REMOTE_ADDR=ip,
    )


def test_sixth_wrong_password_from_one_address_gets_429(admin_user, ratelimit_keys):
    browser = Client()
    ip = fresh_ip()
    for _ in range(5):
        response = attempt(browser, ip)
        assert response.status_code == 200
        assert 'name="password"' in response.content.decode()  # the form again, with the error
    response = attempt(browser, ip)
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    assert "Too many login attempts" in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    # the right password does not get through while the address is limited
    assert attempt(browser, ip, PASSWORD).status_code == 429
    # showing the form is never limited
    assert browser.get("/admin/login/", REMOTE_ADDR=ip).status_code == 200
    # another address is counted on its own
    other = fresh_ip()
    response = attempt(browser, other)
    assert response.status_code == 200 and 'name="password"' in response.content.decode()


def test_successful_login_still_works(admin_user, ratelimit_keys):
    browser = Client()
    ip = fresh_ip()
    for _ in range(3):
        assert attempt(browser, ip).status_code == 200
    response = attempt(browser, ip, PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert browser.get("/admin/", REMOTE_ADDR=ip).status_code == 200


@override_settings(RATELIMIT_ADMIN_LOGIN_RATE="2/m")
def test_rate_comes_from_settings(admin_user, ratelimit_keys):
    browser = Client()
    ip = fresh_ip()
    assert [attempt(browser, ip).status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize("rate", ["5/minute", "five/m", "5", ""])
def test_a_malformed_rate_is_a_configuration_error(rate):
    """django-ratelimit would read "5/minute" as 5 per second; refuse it instead."""
    with override_settings(RATELIMIT_ADMIN_LOGIN_RATE=rate), pytest.raises(ImproperlyConfigured):
        login_rate()


@pytest.mark.parametrize("fail_open, status", [(False, 503), (True, 200)])
def test_redis_down(admin_user, fail_open, status):
    """No counter without Redis: refuse logins (default) or let them through (RATELIMIT_FAIL_OPEN)."""
    unreachable = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                               "LOCATION": "redis://127.0.0.1:1/0"}}
    with override_settings(CACHES=unreachable, RATELIMIT_FAIL_OPEN=fail_open):
        response = attempt(Client(), random_ip())
    assert response.status_code == status
    if status == 503:
        assert response["Retry-After"] == "30"


def test_through_the_asgi_server_the_client_address_is_counted(server, committed_db, ratelimit_keys):
    """Over a real socket REMOTE_ADDR comes from the ASGI scope's client (127.0.0.1 here)."""
    window = window_left("127.0.0.1")
    if window < 3:  # the six POSTs take about a second
        time.sleep(window + 1)
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{server.url}/admin/login/", timeout=10) as page:
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.read().decode())[1]
    form = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": token, "username": "nobody", "password": "wrong"}
    ).encode()
    statuses, retry_after = [], None
    for _ in range(6):
        request = urllib.request.Request(f"{server.url}/admin/login/", data=form)
        request.add_header("Referer", f"{server.url}/admin/login/")
        try:
            with opener.open(request, timeout=10) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as error:
            statuses.append(error.code)
            retry_after = error.headers.get("Retry-After")
    assert statuses == [200] * 5 + [429]
    assert retry_after is not None and int(retry_after) >= 1
