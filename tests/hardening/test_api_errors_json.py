"""Every response under /v1/ is JSON in OpenAI's error shape, whatever Django would have said,
and the run command serves with DEBUG off."""

from __future__ import annotations

import http.client
import json

import pytest
from django.test import Client, override_settings

PROBES = "tests.hardening.probe_urls"


def _assert_openai_error(status: int, headers, body: bytes, expected_status: int, code: str) -> dict:
    assert status == expected_status
    assert headers.get("Content-Type", "").startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert headers.get("x-request-id")
    return error


def _get(server, path: str, host: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{server.port}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_a_bad_host_header_under_v1_gets_a_json_400(server):
    _assert_openai_error(*_get(server, "/v1/anything", host="evil.example"), 400, "bad_request")


def test_an_unknown_v1_url_gets_a_json_404(server):
    error = _assert_openai_error(*_get(server, "/v1/no-such-endpoint"), 404, "unknown_url")
    assert "/v1/no-such-endpoint" in error["message"]


def test_outside_v1_django_keeps_its_own_pages(server):
    status, headers, _ = _get(server, "/admin/", host="evil.example")
    assert status == 400 and not headers.get("Content-Type", "").startswith("application/json")


@pytest.fixture()
def django_client(db):
    with override_settings(ROOT_URLCONF=PROBES, DEBUG=False):
        yield Client(raise_request_exception=False, enforce_csrf_checks=True)


def _check(response, status: int, code: str) -> dict:
    return _assert_openai_error(response.status_code, response.headers, response.content, status, code)


def test_a_method_django_refuses_under_v1_is_a_json_405_with_allow(django_client):
    response = django_client.post("/v1/probe/get-only")
    _check(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET"


def test_a_csrf_failure_under_v1_is_a_json_403(django_client):
    _check(django_client.post("/v1/probe/form", {"x": "1"}), 403, "forbidden")


def test_an_unhandled_exception_under_v1_is_a_json_500(django_client):
    error = _check(django_client.get("/v1/probe/boom"), 500, "internal_error")
    assert "a bug" not in error["message"]


def test_even_in_debug_a_v1_error_is_json_not_a_debug_page(db):
    with override_settings(ROOT_URLCONF=PROBES, DEBUG=True):
        client = Client(raise_request_exception=False)
        _check(client.get("/v1/no-such-endpoint"), 404, "unknown_url")
        _check(client.get("/v1/probe/boom"), 500, "internal_error")
