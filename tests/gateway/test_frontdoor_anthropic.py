"""The Anthropic Messages front door: the official `anthropic` SDK, pointed at the platform,
works unchanged on every lane kind (an Anthropic lane, an OpenAI-compatible lane, `local`).

Every body is validated against Anthropic's strict JSON Schemas (tests/schemas/).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp
import anthropic
import httpx2 as httpx  # the anthropic SDK's HTTP client
import jsonschema
import pytest

from tests.conftest import usage_row

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"anthropic.{name}.schema.json").read_text()))


MESSAGE, STREAM_EVENT, ERROR = _validator("Message"), _validator("MessageStreamEvent"), _validator("ErrorResponse")
LANES = ["claude-sonnet", "gpt-4o-mini", "local"]
LOOKUP = {"name": "lookup", "description": "Look a thing up.",
          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}


@pytest.fixture()
def sdk(server, tenant, fakes_reset):
    return anthropic.Anthropic(base_url=server.url, api_key=tenant[2], max_retries=0, timeout=20)


def create(sdk: anthropic.Anthropic, **kwargs) -> tuple[anthropic.types.Message, httpx.Response]:
    """A whole answer, its raw body validated against anthropic.Message."""
    raw = sdk.messages.with_raw_response.create(**{"max_tokens": 64, **kwargs})
    MESSAGE.validate(raw.http_response.json())
    return raw.parse(), raw.http_response


def sse(server, secret: str, body: dict) -> tuple[int, list[tuple[str, dict]], str]:
    """POST a streamed request with a plain HTTP client: the status, (event name, data) pairs."""
    with httpx.Client(timeout=20) as http:
        response = http.post(f"{server.url}/v1/messages", json={"max_tokens": 64, "stream": True, **body},
                             headers={"x-api-key": secret, "anthropic-version": "2023-06-01"})
        pairs, name = [], None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                (ERROR if name == "error" else STREAM_EVENT).validate(data)
                assert data["type"] == name  # the `event:` line names the data's type
                pairs.append((name, data))
        return response.status_code, pairs, response.headers.get("request-id", "")


# -- whole answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", LANES)
def test_a_text_answer_is_an_anthropic_message_on_every_lane(sdk, model, committed_db):
    message, http = create(sdk, model=model, messages=[{"role": "user", "content": "hello there"}])
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "end_turn"
    assert [block.type for block in message.content] == ["text"]
    assert "hello there" in message.content[0].text
    row = usage_row(http.headers["request-id"])
    assert row.front_door == "anthropic" and row.model == model and row.http_status == 200
    assert message.usage.input_tokens == row.prompt_tokens - row.cached_tokens - row.cache_creation_tokens
    assert message.usage.output_tokens == row.completion_tokens > 0


def test_system_blocks_and_turns_reach_an_openai_lane_as_its_messages(sdk, fake_openai):
    create(sdk, model="gpt-4o-mini", extra_body={"temperature": 0.5, "top_p": 0.9}, system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
           stop_sequences=["END"], metadata={"user_id": "end-user-7"},
           messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                     {"role": "user", "content": [{"type": "text", "text": "second"}]}])
    sent = fake_openai.last_request.body
    assert sent["messages"] == [{"role": "system", "content": "be brief\n\nbe kind"}, {"role": "user", "content": "first"},
                                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["user"]) == (0.5, 0.9, ["END"], "end-user-7")


def test_an_anthropic_lane_receives_the_body_as_the_client_sent_it(sdk, fake_anthropic, committed_db):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "cached context " * 3, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "question [[cache:7,3]]"}]}]
    system = [{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message, http = create(sdk, model="claude-sonnet", max_tokens=2048, system=system, messages=messages, extra_body={"top_k": 5},
                           thinking=thinking, metadata={"user_id": "u-1"})
    sent = fake_anthropic.last_request.body
    assert sent["model"] == "claude-sonnet-4-5" and sent["messages"] == messages and sent["system"] == system
    assert (sent["thinking"], sent["top_k"], sent["metadata"]) == (thinking, 5, {"user_id": "u-1"})
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (7, 3)
    row = usage_row(http.headers["request-id"])
    assert (row.cached_tokens, row.cache_creation_tokens, row.end_user) == (7, 3, "u-1")


def test_images_are_translated_for_an_openai_lane(sdk, fake_openai):
    pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGAAAAAEAAEnNCcKAAAAAElFTkSuQmCC"
    create(sdk, model="gpt-4o-mini", messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": pixel}},
        {"type": "text", "text": "what is this"}]}])
    parts = fake_openai.last_request.body["messages"][0]["content"]
    assert parts == [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
                     {"type": "text", "text": "what is this"}]


# -- tools -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model, prompt", [("claude-sonnet", "find it [[tool:lookup]]"),
                                           ("gpt-4o-mini", "find it [[tool:lookup]]"), ("local", "please lookup it")])
def test_a_tool_round_trip_works_on_every_lane(sdk, model, prompt):
    asked = [{"role": "user", "content": prompt}]
    first, _ = create(sdk, model=model, tools=[LOOKUP], messages=asked)
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "lookup" and isinstance(call.input, dict)
    second, _ = create(sdk, model=model, tools=[LOOKUP], messages=[
        *asked, {"role": "assistant", "content": [block.model_dump(exclude={"caller"}) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "forty-two"}]}])
    assert second.stop_reason == "end_turn" and "forty-two" in second.content[0].text


def test_tool_choice_and_tools_reach_an_openai_lane_as_functions(sdk, fake_openai):
    create(sdk, model="gpt-4o-mini", tools=[LOOKUP], tool_choice={"type": "tool", "name": "lookup",
                                                                   "disable_parallel_tool_use": True},
           messages=[{"role": "user", "content": "x"}])
    sent = fake_openai.last_request.body
    assert sent["tools"] == [{"type": "function", "function": {"name": "lookup", "description": "Look a thing up.",
                                                               "parameters": LOOKUP["input_schema"]}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent["parallel_tool_calls"] is False


# -- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", LANES)
def test_a_streamed_text_answer_follows_anthropics_event_sequence(server, tenant, fakes_reset, model, committed_db):
    status, events, request_id = sse(server, tenant[2], {"model": model, "messages": [{"role": "user", "content": "hi you"}]})
    kinds = [name for name, _ in events]
    deltas = kinds.count("content_block_delta")
    assert status == 200 and deltas >= 1
    assert kinds == ["message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert "hi you" in text
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "end_turn"
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0  # the platform's count, before the provider's
    row = usage_row(request_id)
    assert row.front_door == "anthropic" and row.stream and not row.partial
    assert final["usage"]["output_tokens"] == row.completion_tokens
    assert final["usage"]["input_tokens"] == row.prompt_tokens - row.cached_tokens - row.cache_creation_tokens


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt-4o-mini", "local"])
def test_a_streamed_tool_call_is_a_tool_use_block_with_input_json_deltas(server, tenant, fakes_reset, model):
    prompt = "please lookup [[tool:lookup]]" if model != "local" else "please lookup it"
    _, events, _ = sse(server, tenant[2], {"model": model, "tools": [LOOKUP],
                                           "messages": [{"role": "user", "content": prompt}]})
    starts = [data for name, data in events if name == "content_block_start"]
    tool = next(data for data in starts if data["content_block"]["type"] == "tool_use")
    assert tool["content_block"]["name"] == "lookup" and tool["content_block"]["input"] == {}
    fragments = [data["delta"]["partial_json"] for name, data in events
                 if name == "content_block_delta" and data["index"] == tool["index"]]
    assert isinstance(json.loads("".join(fragments)), dict)
    assert {data["delta"]["type"] for name, data in events if name == "content_block_delta" and data["index"] == tool["index"]} == {"input_json_delta"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_the_sdk_stream_helper_rebuilds_the_final_message(sdk):
    with sdk.messages.stream(model="claude-sonnet", max_tokens=64,
                             messages=[{"role": "user", "content": "stream me [[cache:4,2]]"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    MESSAGE.validate(final.to_dict(mode="json"))
    assert final.content[0].text == text and "stream me" in text and final.stop_reason == "end_turn"
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (4, 2)


def test_an_upstream_failure_after_the_start_ends_the_stream_with_an_error_event(server, tenant, fakes_reset):
    status, events, _ = sse(server, tenant[2], {"model": "claude-sonnet",
                                                "messages": [{"role": "user", "content": "x [[chunks:6]] [[fault:stream_error:5]]"}]})
    assert status == 200 and events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error" and "message_stop" not in [name for name, _ in events]


def test_a_client_hanging_up_mid_stream_releases_its_slot_and_records_a_partial_row(server, tenants, committed_db):
    from llm_platform.redis import get_redis

    tenant, _, secret = tenants.make(tier={"max_concurrent": 1})

    async def hang_up() -> str:
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{server.url}/v1/messages", headers={"x-api-key": secret},
                                          json={"model": "local-slow", "max_tokens": 200, "stream": True,
                                                "messages": [{"role": "user", "content": "tell me a long story " * 5}]})
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"event: content_block_delta")
                if seen == 3:
                    break
            response.close()
            return response.headers["request-id"]

    request_id = asyncio.run(hang_up())
    row = usage_row(request_id)
    assert row.front_door == "anthropic" and row.http_status == 499 and row.error_code == "client_disconnected"
    assert row.partial and row.prompt_tokens > 0 and 1 <= row.completion_tokens < 30
    deadline = time.monotonic() + 2
    while get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc"):
        assert time.monotonic() < deadline, "slot still held after the client left"
        time.sleep(0.05)
    client = anthropic.Anthropic(base_url=server.url, api_key=secret, max_retries=0)
    assert client.messages.create(model="local", max_tokens=5, messages=[{"role": "user", "content": "x"}]).content


# -- count_tokens ----------------------------------------------------------------------------


def test_count_tokens_is_the_platforms_own_count_for_the_route(sdk, committed_db):
    from gateway.tokens import count_messages

    counted = sdk.messages.count_tokens(model="gpt-4o-mini", system="be brief",
                                        messages=[{"role": "user", "content": "how many tokens is this"}])
    expected = count_messages([{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "how many tokens is this"}], "gpt-4o-mini")
    assert counted.input_tokens == expected


def test_count_tokens_for_an_unknown_model_is_a_404_not_found_error(sdk):
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    ERROR.validate(caught.value.body)


# -- errors ----------------------------------------------------------------------------------


def test_a_missing_max_tokens_is_a_400_invalid_request_error(server, tenant):
    response = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": tenant[2]},
                          json={"model": "local", "messages": [{"role": "user", "content": "x"}]})
    body = response.json()
    ERROR.validate(body)
    assert response.status_code == 400 and body["error"] == {"type": "invalid_request_error",
                                                             "message": "max_tokens: Field required"}
    assert body["request_id"] == response.headers["request-id"]


def test_a_bad_request_through_the_sdk_is_a_bad_request_error(sdk):
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model="local", max_tokens=10, messages=[{"role": "system", "content": "x"}])
    ERROR.validate(caught.value.body)
    assert caught.value.body["error"]["message"] == "messages.0.role: Input should be 'user' or 'assistant'"


def test_a_bad_key_is_a_401_authentication_error(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model="local", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ERROR.validate(caught.value.body)
    assert caught.value.body["error"]["type"] == "authentication_error"


def test_an_unknown_model_is_a_404_not_found_error(sdk):
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ERROR.validate(caught.value.body)
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_a_model_the_key_may_not_use_is_a_403_permission_error(server, tenants):
    from tenants.models import ApiKey

    tenant, key, secret = tenants.make()
    ApiKey.objects.filter(pk=key.pk).update(allowed_models=["local"])
    client = anthropic.Anthropic(base_url=server.url, api_key=secret, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    ERROR.validate(caught.value.body)


def test_an_upstream_rate_limit_is_a_429_rate_limit_error(sdk):
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk.messages.create(model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "x [[fault:429]]"}])
    ERROR.validate(caught.value.body)
    assert caught.value.response.headers["retry-after"]


def test_an_overloaded_anthropic_lane_is_a_529_overloaded_error(sdk):
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk.messages.create(model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "x [[fault:529]]"}])
    ERROR.validate(caught.value.body)
    assert caught.value.status_code == 529 and caught.value.body["error"]["type"] == "overloaded_error"


# -- any lane --------------------------------------------------------------------------------


def test_a_failing_openai_lane_falls_back_to_the_anthropic_lane_natively(sdk, fake_openai, fake_anthropic, committed_db):
    fake_openai.fault = "503"
    message, http = create(sdk, model="fallback-openai-first", extra_body={"top_k": 3},
                           messages=[{"role": "user", "content": "fall back"}])
    assert "fall back" in message.content[0].text
    assert fake_anthropic.last_request.body["top_k"] == 3  # the native body, not a translation
    row = usage_row(http.headers["request-id"])
    assert row.provider == "anthropic" and row.retries == 1 and row.front_door == "anthropic"


def test_an_overloaded_anthropic_lane_falls_back_to_openai_mid_route_when_streaming(server, tenant, fakes_reset,
                                                                                    fake_anthropic):
    fake_anthropic.fault = "529"
    status, events, _ = sse(server, tenant[2], {"model": "fallback-anthropic-first",
                                                "messages": [{"role": "user", "content": "stream it"}]})
    assert status == 200 and events[0][1]["message"]["model"] == "fb2-openai"
    assert "".join(d["delta"]["text"] for name, d in events if name == "content_block_delta") == "Echo: stream it"
    assert events[-1][0] == "message_stop"


# -- the core's guarantees, unchanged through this door -----------------------------------------


def test_an_idempotency_key_replays_the_same_message_without_a_second_provider_call(sdk, fake_anthropic):
    key = {"Idempotency-Key": f"idem-{uuid.uuid4()}"}
    ask = {"model": "claude-sonnet", "messages": [{"role": "user", "content": "once only"}]}
    first, _ = create(sdk, extra_headers=key, **ask)
    again, http = create(sdk, extra_headers=key, **ask)
    assert again.model_dump() == first.model_dump() and http.headers["x-idempotent-replayed"] == "true"
    assert sum(1 for r in fake_anthropic.requests if r.path == "/v1/messages") == 1


def test_an_idempotency_key_replays_a_stream_in_anthropics_sequence(server, tenant, fakes_reset, fake_anthropic):
    key = f"idem-{uuid.uuid4()}"
    body = {"model": "claude-sonnet", "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "stream once [[cache:5,1]]"}]}

    def replayable() -> tuple[list[str], str]:
        """The event names and the whole body of one call with the key."""
        response = httpx.post(f"{server.url}/v1/messages", json=body, timeout=20,
                              headers={"x-api-key": tenant[2], "Idempotency-Key": key})
        return [line[7:] for line in response.text.splitlines() if line.startswith("event: ")], response.text

    (first, first_text), (second, second_text) = replayable(), replayable()
    assert first == second and first[0] == "message_start" and first[-1] == "message_stop"
    assert second_text.count('"cache_read_input_tokens":5') == first_text.count('"cache_read_input_tokens":5') == 1
    assert sum(1 for r in fake_anthropic.requests if r.path == "/v1/messages") == 1


def test_a_wrong_method_is_a_405_in_anthropics_shape(server, tenant):
    response = httpx.get(f"{server.url}/v1/messages", headers={"x-api-key": tenant[2]})
    ERROR.validate(response.json())
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_platform_rate_limit_is_a_429_rate_limit_error_with_retry_after(server, tenants):
    _, _, secret = tenants.make(tier={"requests_per_minute": 1})
    client = anthropic.Anthropic(base_url=server.url, api_key=secret, max_retries=0)
    ask = {"model": "local", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    client.messages.create(**ask)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(**ask)
    ERROR.validate(caught.value.body)
    assert int(caught.value.response.headers["retry-after"]) >= 1
