"""The Anthropic adapter: OpenAI-shaped requests in, Anthropic Messages calls out, OpenAI shapes back.

Mapping tests call the pure functions; the rest drive `AnthropicProvider` over real HTTP against
the fake Anthropic server (tests/support/fake_anthropic.py) and validate every output against
OpenAI's JSON Schemas.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from decimal import Decimal
from typing import Any

import jsonschema
import pytest

from gateway.errors import GatewayError
from gateway.providers import anthropic as adapter
from gateway.providers.anthropic import (
    AnthropicProvider,
    finish_reason_for,
    map_messages,
    to_anthropic,
)
from gateway.providers.base import UpstreamError
from gateway.routing import LaneSpec
from gateway.types import ChatRequest, Outcome
from tests.conftest import schema
from tests.support.fake_anthropic import count_input_tokens

COMPLETION = jsonschema.Draft202012Validator(schema("openai.CreateChatCompletionResponse"))
CHUNK = jsonschema.Draft202012Validator(schema("openai.CreateChatCompletionStreamResponse"))
MESSAGE_PARAMS = jsonschema.Draft202012Validator(schema("anthropic.CreateMessageParams"))
KEY = "sk-ant-test-credential-0123456789"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def lane(**options: Any) -> LaneSpec:
    return LaneSpec(
        id=1,
        route_model="claude",
        position=0,
        provider="anthropic",
        upstream_model="claude-sonnet-4-6",
        base_url="",
        api_key_env="",
        context_window=200_000,
        price_input=Decimal("3"),
        price_output=Decimal("15"),
        price_cached_input=Decimal("0.3"),
        options=options,
    )


def chat(messages: list[dict] | str, max_tokens: int | None = None, **params: Any) -> ChatRequest:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return ChatRequest(model="claude", messages=messages, max_tokens=max_tokens, params=params, user=params.get("user"))


# -- request mapping -------------------------------------------------------------------------


def test_system_and_developer_messages_are_hoisted_into_system():
    system, messages = map_messages([
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hello"},
    ])
    assert system == "You are terse.\n\nAnswer in French."
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]


def test_no_system_message_sends_no_system():
    assert "system" not in to_anthropic(lane(), chat("Hello"))


def test_user_images_become_base64_or_url_image_blocks():
    _, messages = map_messages([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
    ]}])
    assert messages[0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_a_data_url_that_is_not_base64_is_refused_naming_the_part():
    with pytest.raises(GatewayError) as caught:
        map_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}])
    assert caught.value.status == 400
    assert caught.value.param == "messages[0].content[0].image_url.url"


def test_audio_parts_are_refused_rather_than_dropped():
    with pytest.raises(GatewayError) as caught:
        map_messages([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    assert (caught.value.status, caught.value.param) == (400, "messages[0].content[0].type")


def test_tool_calls_become_tool_use_and_tool_results_merge_into_one_user_message():
    _, messages = map_messages([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24C"}]},
        {"role": "user", "content": "Thanks, and tomorrow?"},
    ])
    assert messages == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "24C"},
            {"type": "text", "text": "Thanks, and tomorrow?"},
        ]},
    ]


def test_assistant_tool_call_without_text_has_only_tool_use_blocks():
    _, messages = map_messages([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "ping", "arguments": ""}}]},
    ])
    assert messages[1] == {"role": "assistant", "content": [{"type": "tool_use", "id": "call_9", "name": "ping", "input": {}}]}


def test_consecutive_same_role_messages_are_merged_for_alternation():
    _, messages = map_messages([
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "three"},
        {"role": "assistant", "content": [{"type": "text", "text": "four"}]},
    ])
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert [b["text"] for b in messages[0]["content"]] == ["one", "two"]
    assert [b["text"] for b in messages[1]["content"]] == ["three", "four"]


def test_tool_arguments_that_are_not_a_json_object_are_a_400_naming_them():
    with pytest.raises(GatewayError) as caught:
        map_messages([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"city": "Par'}}]},
        ])
    assert caught.value.status == 400
    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


def test_max_tokens_is_always_sent_defaulting_to_the_lane_option_then_4096():
    assert to_anthropic(lane(), chat("Hi"))["max_tokens"] == 4096
    assert to_anthropic(lane(default_max_tokens=1024), chat("Hi"))["max_tokens"] == 1024
    assert to_anthropic(lane(default_max_tokens=1024), chat("Hi", max_tokens=77))["max_tokens"] == 77


def test_sampling_stop_and_user_parameters_are_translated():
    kwargs = to_anthropic(lane(), chat("Hi", temperature=1.6, top_p=0.9, stop="END", user="user-42"))
    assert kwargs["temperature"] == 1.0  # Anthropic's range ends at 1
    assert kwargs["top_p"] == 0.9
    assert kwargs["stop_sequences"] == ["END"]
    assert kwargs["metadata"] == {"user_id": "user-42"}
    assert kwargs["model"] == "claude-sonnet-4-6"
    assert to_anthropic(lane(), chat("Hi", stop=["a", "b"]))["stop_sequences"] == ["a", "b"]


def test_parameters_without_an_anthropic_equivalent_are_not_forwarded():
    kwargs = to_anthropic(lane(), chat(
        "Hi", seed=7, presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=2,
        logit_bias={"1": 2}, response_format={"type": "json_object"}, reasoning_effort="low",
    ))
    assert set(kwargs) == {"model", "max_tokens", "messages"}


def test_tools_become_input_schemas_with_an_empty_object_when_parameters_are_missing():
    bare = {"type": "function", "function": {"name": "now"}}
    kwargs = to_anthropic(lane(), chat("Hi", tools=[WEATHER, bare]))
    assert kwargs["tools"] == [
        {"name": "get_weather", "description": "Weather for a city.", "input_schema": WEATHER["function"]["parameters"]},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in kwargs


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    ("none", None, {"type": "none"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    ("auto", True, {"type": "auto"}),
])
def test_tool_choice_mapping(choice, parallel, expected):
    params: dict[str, Any] = {"tools": [WEATHER]}
    if choice is not None:
        params["tool_choice"] = choice
    if parallel is not None:
        params["parallel_tool_calls"] = parallel
    assert to_anthropic(lane(), chat("Hi", **params))["tool_choice"] == expected


def test_n_greater_than_one_is_refused_with_a_400_on_n():
    with pytest.raises(GatewayError) as caught:
        to_anthropic(lane(), chat("Hi", n=2))
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "n", "unsupported_parameter")
    assert "n" not in to_anthropic(lane(), chat("Hi", n=1))


def test_a_full_mapped_request_is_a_valid_anthropic_create_message_body():
    req = chat([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AA="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3C"},
    ], max_tokens=100, tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False, temperature=0.2, stop="\n\n", user="u1")
    MESSAGE_PARAMS.validate(to_anthropic(lane(), req))


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("something_new", "stop"),
])
def test_stop_reason_maps_to_finish_reason(stop_reason, finish):
    assert finish_reason_for(stop_reason) == finish


# -- against the fake Anthropic server -------------------------------------------------------


@pytest.fixture()
def fake(fake_anthropic):
    fake_anthropic.reset()
    yield fake_anthropic
    fake_anthropic.reset()


async def _complete(fake, req: ChatRequest, outcome: Outcome, the_lane: LaneSpec | None = None) -> dict:
    provider = AnthropicProvider(fake.root_url, KEY)  # the SDK's base_url is the root, without /v1
    try:
        completion = await provider.complete(the_lane or lane(), req, outcome)
    finally:
        await provider.aclose()
    return completion.as_dict


async def _stream(fake, req: ChatRequest, outcome: Outcome) -> list:
    provider = AnthropicProvider(fake.root_url, KEY)
    try:
        return [chunk async for chunk in provider.stream(lane(), req, outcome)]
    finally:
        await provider.aclose()


def complete(fake, req: ChatRequest, outcome: Outcome | None = None) -> dict:
    obj = asyncio.run(_complete(fake, req, outcome or Outcome()))
    COMPLETION.validate(obj)
    return obj


def stream(fake, req: ChatRequest, outcome: Outcome | None = None) -> list:
    chunks = asyncio.run(_stream(fake, req, outcome or Outcome()))
    for chunk in chunks:
        CHUNK.validate(chunk.as_dict)
    return chunks


def reassemble(chunks: list) -> dict:
    """Text, tool calls and finish reason as an OpenAI client would rebuild them."""
    text, calls, finish = [], {}, None
    for chunk in chunks:
        for choice in chunk.as_dict["choices"]:
            delta = choice["delta"]
            text.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] = call.get("function", {}).get("name") or slot["name"]
                slot["arguments"] += call.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return {"text": "".join(text), "calls": [calls[k] for k in sorted(calls)], "finish": finish}


def test_text_answer_is_an_openai_chat_completion(fake):
    outcome = Outcome(completion_text_parts=[])
    before = time.perf_counter()
    obj = complete(fake, chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}]), outcome)

    assert obj["object"] == "chat.completion"
    assert obj["id"].startswith("chatcmpl-msg_")
    assert obj["model"] == "claude-sonnet-4-6"
    assert obj["choices"] == [{
        "index": 0,
        "message": {"role": "assistant", "content": "Echo: hello there", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }]
    assert outcome.finish_reason == "stop"
    assert outcome.upstream_model == "claude-sonnet-4-6"
    assert outcome.provider_request_id.startswith("req_")
    assert outcome.first_token_at is not None and outcome.first_token_at >= before
    assert outcome.completion_text_parts == ["Echo: hello there"]

    sent = fake.last_request
    assert sent.path == "/v1/messages"
    assert KEY in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "").removeprefix("Bearer "))
    assert sent.body["system"] == "Be kind."
    assert sent.body["max_tokens"] == 4096
    assert len(fake.requests) == 1  # the SDK does not retry on its own


def test_usage_counts_cached_input_in_prompt_tokens(fake):
    outcome = Outcome()
    obj = complete(fake, chat("count me [[cache:7,3]] [[chunks:5]]"), outcome)
    fresh = count_input_tokens(fake.last_request.body)  # the fake's input_tokens, cache excluded
    assert obj["usage"] == {
        "prompt_tokens": fresh + 7 + 3,
        "completion_tokens": 5,
        "total_tokens": fresh + 15,
        "prompt_tokens_details": {"cached_tokens": 7},
    }
    usage = outcome.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_creation_tokens) == (fresh + 10, 5, 7, 3)


def test_tool_use_answer_becomes_tool_calls(fake):
    obj = complete(fake, chat("weather in Oslo [[tool:get_weather]]", tools=[WEATHER]))
    choice = obj["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("toolu_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"q": "weather in Oslo"}
    assert fake.last_request.body["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]


@pytest.mark.parametrize(("directive", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("brand_new_reason", "stop"),
])
def test_each_stop_reason_reaches_the_client_as_a_finish_reason(fake, directive, finish):
    outcome = Outcome()
    obj = complete(fake, chat(f"hi [[stop:{directive}]]"), outcome)
    assert obj["choices"][0]["finish_reason"] == finish
    assert outcome.finish_reason == finish
    chunks = stream(fake, chat(f"hi [[stop:{directive}]]"))
    assert reassemble(chunks)["finish"] == finish


def test_a_real_max_tokens_cut_is_length(fake):
    obj = complete(fake, chat("a rather long sentence to cut [[chunks:10]]", max_tokens=3))
    assert fake.last_request.body["max_tokens"] == 3
    assert obj["choices"][0]["finish_reason"] == "length"
    assert obj["usage"]["completion_tokens"] == 3


def test_streamed_text_reassembles_and_ends_with_a_usage_only_chunk(fake):
    outcome = Outcome(completion_text_parts=[])
    chunks = stream(fake, chat("stream me please [[chunks:6]] [[cache:4,2]]"), outcome)
    dicts = [c.as_dict for c in chunks]

    assert dicts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {(d["id"], d["created"], d["model"]) for d in dicts} == {(dicts[0]["id"], dicts[0]["created"], "claude-sonnet-4-6")}
    assert dicts[0]["id"].startswith("chatcmpl-msg_")
    assert all(d["object"] == "chat.completion.chunk" for d in dicts)
    assert [c.usage_only for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert dicts[-1]["choices"] == []
    fresh = count_input_tokens(fake.last_request.body)
    assert dicts[-1]["usage"] == {
        "prompt_tokens": fresh + 4 + 2, "completion_tokens": 6, "total_tokens": fresh + 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    rebuilt = reassemble(chunks)
    assert rebuilt == {"text": "Echo: stream me please", "calls": [], "finish": "stop"}
    assert "".join(outcome.completion_text_parts) == "Echo: stream me please"
    assert len(outcome.completion_text_parts) == 6
    assert outcome.first_token_at is not None
    assert outcome.finish_reason == "stop"
    assert outcome.provider_request_id.startswith("req_")
    assert (outcome.usage.prompt_tokens, outcome.usage.cached_tokens, outcome.usage.cache_creation_tokens) == (fresh + 6, 4, 2)
    assert fake.last_request.body["stream"] is True


def test_streamed_tool_calls_reassemble_with_one_index_per_call(fake):
    calc = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}}}
    outcome = Outcome()
    chunks = stream(fake, chat("do both [[tool:get_weather]] [[tool:calc]] [[chunks:4]]", tools=[WEATHER, calc]), outcome)
    rebuilt = reassemble(chunks)
    assert rebuilt["finish"] == "tool_calls"
    assert [c["name"] for c in rebuilt["calls"]] == ["get_weather", "calc"]
    assert all(c["id"].startswith("toolu_") for c in rebuilt["calls"])
    assert [json.loads(c["arguments"]) for c in rebuilt["calls"]] == [{"q": "do both"}, {"q": "do both"}]
    starts = [call for c in chunks for ch in c.as_dict["choices"] for call in ch["delta"].get("tool_calls") or [] if "id" in call]
    assert [s["function"]["arguments"] for s in starts] == ["", ""]
    assert outcome.first_token_at is not None
    assert outcome.finish_reason == "tool_calls"


def test_rate_limit_is_a_retryable_429_carrying_retry_after(fake):
    with pytest.raises(UpstreamError) as caught:
        complete(fake, chat("hi [[fault:429:2500]]"))
    error = caught.value
    assert (error.status, error.code, error.retryable, error.upstream_status) == (429, "upstream_rate_limited", True, 429)
    assert error.retry_after == 2.5  # retry-after-ms wins over the rounded retry-after
    assert error.headers["Retry-After"] == "3"


def test_overloaded_529_is_a_retryable_502(fake):
    with pytest.raises(UpstreamError) as caught:
        complete(fake, chat("hi [[fault:529]]"))
    assert (caught.value.status, caught.value.retryable, caught.value.upstream_status) == (502, True, 529)


def test_overloaded_529_before_a_stream_starts_is_a_retryable_502(fake):
    with pytest.raises(UpstreamError) as caught:
        stream(fake, chat("hi [[fault:529]]"))
    assert (caught.value.status, caught.value.retryable) == (502, True)


def test_refused_credentials_are_a_502_that_never_echoes_the_key(fake):
    fake.api_key = "sk-ant-the-right-one"
    with pytest.raises(UpstreamError) as caught:
        complete(fake, chat("hi"))
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (502, "upstream_auth_failed", False)
    assert KEY not in caught.value.message and KEY[:12] not in caught.value.message


def test_an_upstream_400_is_a_400_for_the_client(fake):
    with pytest.raises(UpstreamError) as caught:
        complete(fake, chat("hi [[fault:400]]"))
    assert (caught.value.status, caught.value.type) == (400, "invalid_request_error")


def test_a_stream_cut_midway_is_an_upstream_error(fake):
    outcome = Outcome()
    got: list = []

    async def consume() -> None:
        provider = AnthropicProvider(fake.root_url, KEY)
        try:
            async for chunk in provider.stream(lane(), chat("hi there [[fault:cut:4]]"), outcome):
                got.append(chunk)
        finally:
            await provider.aclose()

    with pytest.raises(UpstreamError) as caught:
        asyncio.run(consume())
    assert (caught.value.status, caught.value.code) == (502, "upstream_stream_cut")
    assert got and not any(c.usage_only for c in got)


def test_an_error_event_mid_stream_is_an_upstream_error(fake):
    with pytest.raises(UpstreamError) as caught:
        stream(fake, chat("hi [[fault:stream_error:3]]"))
    assert (caught.value.status, caught.value.code) == (502, "upstream_stream_error")
    assert "Overloaded" in caught.value.message


def test_a_malformed_answer_is_a_retryable_502(fake):
    with pytest.raises(UpstreamError) as caught:
        complete(fake, chat("hi [[fault:malformed]]"))
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (502, "upstream_malformed", True)


def test_an_unreachable_provider_is_a_retryable_502():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there

    class Nowhere:
        root_url = f"http://127.0.0.1:{port}"

    with pytest.raises(UpstreamError) as caught:
        complete(Nowhere, chat("hi"))
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (502, "upstream_unreachable", True)


def test_a_provider_slower_than_the_timeout_is_a_retryable_504(fake, monkeypatch):
    monkeypatch.setattr(adapter, "timeouts", lambda: (1.0, 0.2))
    with pytest.raises(UpstreamError) as caught:
        complete(fake, chat("hi [[fault:slow_first_byte:2000]]"))
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (504, "upstream_timeout", True)


async def _disconnect_seen(fake) -> bool:
    """Whether the fake saw the client hang up, checked while the provider's pool is still
    open (closing the pool would drop the connection anyway)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if fake.last_request.outcome == "disconnected":
            return True
        await asyncio.sleep(0.02)
    return False


def test_closing_the_stream_early_drops_the_upstream_connection(fake):
    async def read_two_then_close() -> tuple[int, bool]:
        provider = AnthropicProvider(fake.root_url, KEY)
        try:
            chunks = provider.stream(lane(), chat("a long answer [[chunks:40]] [[fault:drip:50]]"), Outcome())
            got = [await anext(chunks), await anext(chunks)]
            await chunks.aclose()  # the client went away
            return len(got), await _disconnect_seen(fake)
        finally:
            await provider.aclose()

    assert asyncio.run(read_two_then_close()) == (2, True)
    assert fake.disconnects == 1


def test_cancelling_the_consumer_drops_the_upstream_connection(fake):
    async def cancel_midway() -> bool:
        provider = AnthropicProvider(fake.root_url, KEY)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in provider.stream(lane(), chat("a long answer [[chunks:40]] [[fault:drip:50]]"), Outcome()):
                first.set()

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(first.wait(), 3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await _disconnect_seen(fake)
        finally:
            await provider.aclose()

    assert asyncio.run(cancel_midway())
