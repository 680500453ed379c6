"""An upstream that echoes the credential it was sent, in a shape no pattern would guess
(`gsk_live_...`): the tenant, the logs and the usage row never see it."""

from __future__ import annotations

import io
import json
import logging
import secrets
import urllib.error
import urllib.request

import pytest

from llm_platform.logs import JsonFormatter
from tests.conftest import ROOT, Server, usage_row

ODD_KEY = f"gsk_live_{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def echoing(routes, flushed_redis, fake_openai):
    (ROOT / ".data").mkdir(exist_ok=True)
    srv = Server({"FAKE_UPSTREAM_KEY": ODD_KEY, "LOG_LEVEL": "INFO"})
    fake_openai.echo_key = True
    yield srv
    fake_openai.echo_key = False
    srv.stop()


def _post(server, key: str, body: dict) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_an_echoed_key_never_reaches_the_tenant_the_usage_row_or_the_log(echoing, fake_openai, tenant):
    status, headers, body = _post(echoing, tenant[2], {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[fault:400]]"}]})
    assert fake_openai.last_request.headers["authorization"] == f"Bearer {ODD_KEY}"
    assert status == 400
    assert ODD_KEY not in body.decode()
    error = json.loads(body)["error"]
    assert error["message"].endswith("Key used: [redacted]")
    assert error["code"] == "key_[redacted]"
    row = usage_row(headers["x-request-id"])
    assert row.error_code == "key_[redacted]"

    echoing.stop()  # flushes its log
    log = (ROOT / ".data" / f"server-{echoing.port}.log").read_text()
    assert '"error_code": "key_[redacted]"' in log or '"error_code":"key_[redacted]"' in log
    assert ODD_KEY not in log


def test_an_echoed_key_never_reaches_the_tenant_in_a_mid_stream_error(routes, flushed_redis, fake_openai, tenant):
    (ROOT / ".data").mkdir(exist_ok=True)
    server = Server({"FAKE_UPSTREAM_KEY": ODD_KEY})
    fake_openai.echo_key = True
    try:
        status, _, body = _post(server, tenant[2], {
            "model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "hi [[fault:stream_error:2]]"}]})
    finally:
        fake_openai.echo_key = False
        server.stop()
    assert status == 200
    text = body.decode()
    assert ODD_KEY not in text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["message"].endswith("Key used: [redacted]")


def test_the_log_handler_removes_a_configured_credential_from_every_part_of_a_line(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ODD_KEY)
    # The handler settings.LOGGING configures, writing into a buffer for the test.
    handler = next(h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter))
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    try:
        try:
            raise RuntimeError(f"upstream said {ODD_KEY}")
        except RuntimeError:
            logging.getLogger("gateway.test_credentials").exception(
                "provider answered %s", ODD_KEY, extra={"detail": f"Bearer {ODD_KEY}"})
    finally:
        handler.setStream(previous)
    written = buffer.getvalue()
    line = json.loads(written)
    assert ODD_KEY not in written
    assert line["msg"] == "provider answered [redacted]"
    assert line["detail"] == "Bearer [redacted]"
    assert line["exc"].endswith("RuntimeError: upstream said [redacted]")
