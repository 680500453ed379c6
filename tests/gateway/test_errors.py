"""Every client-caused failure is a 4xx in OpenAI's error shape, with a request id."""

from __future__ import annotations

import json
import urllib.request

import jsonschema
import openai
import pytest

from gateway.errors import GatewayError
from tests.conftest import schema

ERROR_SCHEMA = schema("openai.ErrorResponse")


def call(server, path: str, body: bytes | None = None, method: str = "POST", headers: dict | None = None):
    request = urllib.request.Request(f"{server.url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def assert_error(status, headers, body, expected_status, code=None, param=None):
    assert status == expected_status, body
    payload = json.loads(body)
    jsonschema.validate(payload, ERROR_SCHEMA)
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert headers.get("content-type", headers.get("Content-Type")).startswith("application/json")
    assert headers.get("x-request-id")
    if code is not None:
        assert payload["error"]["code"] == code
    if param is not None:
        assert payload["error"]["param"] == param
    return payload["error"]


def auth(secret):
    return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}


def chat_body(**overrides) -> bytes:
    body = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
    body.update(overrides)
    return json.dumps(body).encode()


def test_malformed_json_is_400(server, tenant):
    error = assert_error(*call(server, "/v1/chat/completions", b"{not json", headers=auth(tenant[2])), 400)
    assert "JSON" in error["message"]


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}, "messages[1].role"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": None}, "model"),
    ],
)
def test_invalid_fields_are_400_naming_the_parameter(server, tenant, overrides, param):
    assert_error(*call(server, "/v1/chat/completions", chat_body(**overrides), headers=auth(tenant[2])), 400, param=param)


def nested(depth: int, leaf=None) -> dict:
    """{"a": {"a": ... leaf}} `depth` objects deep, built without recursion."""
    value = leaf if leaf is not None else {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALLED = {"role": "assistant", "content": None,
          "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}


def _with_arguments(arguments) -> list[dict]:
    call = {**CALLED["tool_calls"][0], "function": {"name": "get_time", "arguments": arguments}}
    return [{"role": "user", "content": "hi"}, {**CALLED, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]


def _strict_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": schema}}


# Each of these answered 500 before (issue 20, point 3): the validator let a value of the wrong
# type, or nested past what orjson and jsonschema handle, through to the code that reads it.
@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": {"user": 1}, "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "x", "name": 7}]}, "messages[0].name"),
        ({"messages": _with_arguments({"q": 1})}, "messages[1].tool_calls[0].function.arguments"),
        ({"messages": _with_arguments(None)}, "messages[1].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}, "text": 5}]}]},
         "messages[0].content[0].text"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": "get_time"}}, "tool_choice.function"),
        ({"tools": [{"type": "function", "function": {"name": "deep", "parameters": nested(300)}}]},
         "tools[0].function.parameters"),
        ({"response_format": _strict_schema(nested(300))}, "response_format.json_schema.schema"),
        ({"response_format": _strict_schema({"$schema": ["draft"], "type": "object"})},
         "response_format.json_schema.schema"),
    ],
    ids=["role-list", "role-object", "part-type-list", "numeric-name", "arguments-object", "arguments-null",
         "image-part-numeric-text", "tool-choice-function-string", "deep-tool-parameters", "deep-strict-schema",
         "schema-dialect-list"],
)
def test_values_that_crashed_the_validator_are_400_naming_the_parameter(server, tenant, overrides, param):
    assert_error(*call(server, "/v1/chat/completions", chat_body(**overrides), headers=auth(tenant[2])), 400, param=param)


@pytest.mark.parametrize("stream", [False, True])
def test_a_field_nested_300_deep_with_an_idempotency_key_is_400_naming_it(server, tenant, stream):
    body = chat_body(stream=stream, extra=nested(300))
    headers = {**auth(tenant[2]), "Idempotency-Key": f"deep-{stream}"}
    error = assert_error(*call(server, "/v1/chat/completions", body, headers=headers), 400, param="extra")
    assert "nested more than 64 levels" in error["message"]


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"extra": nested(100)}, "extra"),
        ({"logit_bias": nested(100)}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x", "extra": nested(100)}]}, "messages[0].extra"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "extra": nested(100)}]}]},
         "messages[0].content[0].extra"),
        ({"messages": [{"role": "user", "content": "x"}, {**CALLED, "tool_calls": [
            {**CALLED["tool_calls"][0], "function": {"name": "f", "arguments": "{}", "extra": nested(100)}}]}]},
         "messages[1].tool_calls[0].function.extra"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": nested(100)}}},
         "response_format.json_schema.schema"),
    ],
)
def test_nesting_past_64_levels_is_400_naming_where_it_starts(overrides, param):
    """Named down to where the gateway's own shape ends: the field a client can find and fix."""
    from gateway.api.validation import parse_json, validate_chat

    with pytest.raises(GatewayError) as caught:
        validate_chat(parse_json(chat_body(**overrides)))
    assert (caught.value.status, caught.value.param) == (400, param)
    assert "nested more than 64 levels" in caught.value.message


def test_tool_arguments_nested_past_what_json_parses_are_400_on_an_anthropic_lane(server, tenant):
    """The Anthropic mapping parses tool-call arguments; past ~1000 levels that is a RecursionError."""
    arguments = '{"a":' * 3000 + "1" + "}" * 3000
    body = chat_body(model="claude-sonnet", messages=_with_arguments(arguments))
    assert_error(*call(server, "/v1/chat/completions", body, headers=auth(tenant[2])), 400,
                 param="messages[1].tool_calls[0].function.arguments")


def test_a_user_field_with_nul_is_400_as_its_usage_row_could_not_be_stored(server, tenant):
    assert_error(*call(server, "/v1/chat/completions", chat_body(user="a\u0000b"), headers=auth(tenant[2])), 400,
                 param="user")


def test_nesting_up_to_the_limit_is_accepted(server, tenant):
    """The body is level 1, tools 2, the tool 3, function 4: parameters may nest 60 levels."""
    tools = [{"type": "function", "function": {"name": "deep", "parameters": nested(60, {"type": "object"})}}]
    headers = {**auth(tenant[2]), "Idempotency-Key": "deep-but-allowed"}
    status, _, body = call(server, "/v1/chat/completions", chat_body(tools=tools), headers=headers)
    assert status == 200, body
    error = assert_error(*call(server, "/v1/chat/completions", chat_body(
        tools=[{"type": "function", "function": {"name": "deep", "parameters": nested(61, {"type": "object"})}}]),
        headers=auth(tenant[2])), 400, param="tools[0].function.parameters")
    assert "64 levels" in error["message"]


def test_unknown_extra_fields_are_ignored(server, tenant):
    status, _, body = call(server, "/v1/chat/completions", chat_body(frobnicate=True, store=False), headers=auth(tenant[2]))
    assert status == 200, body


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
        ({"Authorization": "Bearer short"}, "invalid_api_key"),
        ({"Authorization": "Bearer sk-gw-" + "x" * 43}, "invalid_api_key"),
    ],
)
def test_missing_malformed_or_unknown_keys_are_401(server, headers, code):
    assert_error(*call(server, "/v1/chat/completions", chat_body(), headers=headers), 401, code=code)


def test_revoked_key_is_401(server, tenants):
    _, key, secret = tenants.make()
    key.revoke()
    assert_error(*call(server, "/v1/chat/completions", chat_body(), headers=auth(secret)), 401)


def test_expired_key_is_401(server, tenants):
    from datetime import timedelta

    from django.utils import timezone

    _, key, secret = tenants.make()
    key.expires_at = timezone.now() - timedelta(seconds=1)
    key.save()
    error = assert_error(*call(server, "/v1/chat/completions", chat_body(), headers=auth(secret)), 401, code="expired_api_key")
    assert "expired" in error["message"]


def test_model_not_allowed_for_the_tier_is_403(server, tenants):
    _, _, secret = tenants.make(tier={"allowed_models": ["local"]})
    assert_error(*call(server, "/v1/chat/completions", chat_body(model="gpt-4o-mini"), headers=auth(secret)), 403, code="model_not_allowed")


def test_unknown_model_is_404(server, tenant):
    assert_error(*call(server, "/v1/chat/completions", chat_body(model="no-such-model"), headers=auth(tenant[2])), 404, code="model_not_found")


def test_unknown_url_under_v1_is_404_json(server, tenant):
    assert_error(*call(server, "/v1/nothing/here", method="GET", headers=auth(tenant[2])), 404)


def test_wrong_method_is_405(server, tenant):
    assert_error(*call(server, "/v1/chat/completions", method="GET", headers=auth(tenant[2])), 405)


def test_oversized_body_is_413(server, tenant):
    big = chat_body(messages=[{"role": "user", "content": "x" * (5 * 1024 * 1024)}])
    assert_error(*call(server, "/v1/chat/completions", big, headers=auth(tenant[2])), 413)


def test_max_tokens_above_the_tier_cap_is_400(server, tenants):
    _, _, secret = tenants.make(tier={"max_tokens_cap": 100})
    assert_error(*call(server, "/v1/chat/completions", chat_body(max_tokens=101), headers=auth(secret)), 400, param="max_tokens")


def test_lane_without_its_credential_is_503(server, tenant):
    status, headers, body = call(server, "/v1/chat/completions", chat_body(model="unconfigured"), headers=auth(tenant[2]))
    assert_error(status, headers, body, 503, code="provider_not_configured")


def test_client_request_id_is_echoed_when_sane(server, tenant):
    status, headers, _ = call(server, "/v1/chat/completions", chat_body(), headers={**auth(tenant[2]), "X-Request-ID": "client-abc.123"})
    assert status == 200 and headers["x-request-id"] == "client-abc.123"
    status, headers, _ = call(server, "/v1/chat/completions", chat_body(), headers={**auth(tenant[2]), "X-Request-ID": "bad id with spaces"})
    assert headers["x-request-id"].startswith("req_")


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}], temperature=9)
