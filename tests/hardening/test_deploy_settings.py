"""Production settings: `manage.py check --deploy` is clean with the README's production
environment, and GW_TLS=1 makes a real server send HSTS, redirect to HTTPS and mark cookies secure."""

from __future__ import annotations

import http.client
import os
import secrets
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Server

# The README's production environment ("In production"), with a fresh secret.
PRODUCTION_ENV = {"GW_TLS": "1", "ALLOWED_HOSTS": "api.example.com"}


def _check_deploy(extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG",) and not k.startswith("GW_")}
    env.update({"SECRET_KEY": secrets.token_urlsafe(50), **extra})
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean_with_the_documented_production_environment():
    result = _check_deploy(PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_without_tls_declared_check_deploy_names_what_is_missing():
    result = _check_deploy({"ALLOWED_HOSTS": "api.example.com"})
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr + result.stdout


@pytest.fixture(scope="module")
def tls_server(routes, flushed_redis):
    srv = Server({"GW_TLS": "1"})
    yield srv
    srv.stop()


def _get(server, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_plain_http_is_redirected_to_https(tls_server):
    response = _get(tls_server, "/admin/login/")
    assert response.status == 301
    assert response.headers["Location"] == f"https://127.0.0.1:{tls_server.port}/admin/login/"


def test_https_from_the_load_balancer_gets_hsts_and_secure_cookies(tls_server):
    response = _get(tls_server, "/admin/login/", {"X-Forwarded-Proto": "https"})
    assert response.status == 200
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert "secure" in response.headers["Set-Cookie"].lower().split("; ")


def test_load_balancer_probes_over_plain_http_are_not_redirected(tls_server):
    assert _get(tls_server, "/ready").status == 200
    assert _get(tls_server, "/health").status == 200


def test_the_api_is_never_redirected(tls_server):
    response = _get(tls_server, "/v1/no-such-endpoint")
    assert response.status == 404 and response.headers["Content-Type"] == "application/json"
