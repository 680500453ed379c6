"""The fake upstreams speak the vendors' wire protocols, as the official SDKs and JSON Schemas see them.

No Django here: these tests only need the fakes, the SDKs and the JSON Schemas in ``tests/schemas``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import jsonschema
import openai
import pytest

from tests.support.fake_anthropic import FakeAnthropic
from tests.support.fake_openai import FakeOpenAI

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
OPENAI_MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
WEATHER_OPENAI: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]
WEATHER_ANTHROPIC: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]


# -- helpers --------------------------------------------------------------------------------


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    with (SCHEMAS / f"{name}.schema.json").open() as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def assert_valid(name: str, instance: Any) -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{name}: {[f'{list(e.path)}: {e.message}' for e in errors[:3]]}"


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, "\n".join(data)))
    return events


def user(text: str) -> Any:
    """A one-message conversation (typed ``Any``: the SDKs want their own TypedDicts)."""
    return [{"role": "user", "content": text}]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(timeout_seconds=10) as server:
        yield server


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(timeout_seconds=10) as server:
        yield server


@pytest.fixture
def fake_openai(openai_server: FakeOpenAI) -> FakeOpenAI:
    openai_server.reset()
    return openai_server


@pytest.fixture
def fake_anthropic(anthropic_server: FakeAnthropic) -> FakeAnthropic:
    anthropic_server.reset()
    return anthropic_server


@pytest.fixture
def oai(fake_openai: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=fake_openai.sdk_base_url, api_key="sk-test", max_retries=0, timeout=5
    )


@pytest.fixture
def claude(fake_anthropic: FakeAnthropic) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=fake_anthropic.sdk_base_url, api_key="sk-ant-test", max_retries=0, timeout=5
    )


def openai_raw_stream(
    oai: openai.OpenAI, **kwargs: Any
) -> tuple[dict[str, str], list[tuple[str | None, str]]]:
    with oai.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
        return dict(resp.headers), sse(resp.read().decode())


def anthropic_raw_stream(
    claude: anthropic.Anthropic, **kwargs: Any
) -> tuple[dict[str, str], list[tuple[str | None, str]]]:
    with claude.messages.with_streaming_response.create(stream=True, **kwargs) as resp:
        return dict(resp.headers), sse(resp.read().decode())


# -- OpenAI: answers ------------------------------------------------------------------------


def test_openai_completion_echoes_last_user_message_with_deterministic_usage(
    oai: openai.OpenAI,
) -> None:
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello big world"},
    ]
    raw = oai.chat.completions.with_raw_response.create(model=OPENAI_MODEL, messages=messages)
    body = raw.http_response.json()
    assert_valid("openai.CreateChatCompletionResponse", body)
    assert REQUEST_ID.match(raw.headers["x-request-id"])
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: hello big world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        2 + 3 + 3 + 3,
        5,
    )
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_openai_stream_chunks_validate_and_end_with_done(oai: openai.OpenAI) -> None:
    headers, events = openai_raw_stream(
        oai,
        model=OPENAI_MODEL,
        messages=user("stream me please"),
        stream_options={"include_usage": True},
    )
    assert REQUEST_ID.match(headers["x-request-id"])
    assert headers["content-type"].startswith("text/event-stream")
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    for chunk in chunks:
        assert_valid("openai.CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(pieces) == 5 and "".join(pieces) == "Echo: stream me please"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_openai_stream_without_include_usage_sends_no_usage(oai: openai.OpenAI) -> None:
    _, events = openai_raw_stream(oai, model=OPENAI_MODEL, messages=user("hi"))
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_openai_sdk_stream_assembles_content_and_usage(
    oai: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    fake_openai.chunks = 3
    stream = oai.chat.completions.create(
        model=OPENAI_MODEL,
        messages=user("abc def"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: abc def"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_openai_max_tokens_below_chunk_count_truncates_with_length(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("hello world"), max_tokens=2
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert "Echo: hello world".startswith(completion.choices[0].message.content or "")


def test_openai_stop_string_cuts_the_reply(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("one two three"), stop=["two"]
    )
    assert completion.choices[0].message.content == "Echo: one "
    assert completion.choices[0].finish_reason == "stop"


def test_openai_n_returns_n_choices(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=OPENAI_MODEL, messages=user("hi there"), n=3
    )
    assert_valid("openai.CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {"Echo: hi there"}
    assert completion.usage is not None and completion.usage.completion_tokens == 15


def test_openai_cache_directive_reports_cached_tokens_inside_prompt_tokens(
    oai: openai.OpenAI,
) -> None:
    completion = oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi [[cache:40]]"))
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 40
    assert completion.usage.prompt_tokens == 40 + 2 + 3
    assert completion.choices[0].message.content == "Echo: hi"


def test_openai_tool_call_from_directive(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=OPENAI_MODEL,
        messages=user("weather in Paris [[tool:get_weather]]"),
        tools=WEATHER_OPENAI,
    )
    assert_valid("openai.CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"q": "weather in Paris"}


def test_openai_tool_call_streams_like_openai(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": OPENAI_MODEL,
        "messages": user("weather in Paris"),
        "tools": WEATHER_OPENAI,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    _, events = openai_raw_stream(oai, **kwargs)
    chunks = [json.loads(data) for _, data in events[:-1]]
    for chunk in chunks:
        assert_valid("openai.CreateChatCompletionStreamResponse", chunk)
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-1]]
    assert len(fragments) > 1 and all(set(f) == {"index", "function"} for f in fragments)
    assert json.loads("".join(f["function"]["arguments"] for f in fragments)) == {
        "q": "weather in Paris"
    }
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    calls: dict[int, str] = {}
    for chunk in oai.chat.completions.create(stream=True, **kwargs):
        for call in chunk.choices[0].delta.tool_calls or []:
            calls[call.index] = calls.get(call.index, "") + (call.function.arguments or "")
    assert json.loads(calls[0]) == {"q": "weather in Paris"}


def test_openai_tool_result_is_echoed_without_calling_again(oai: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "user", "content": "weather? [[tool:get_weather]]"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    completion = oai.chat.completions.create(
        model=OPENAI_MODEL, messages=messages, tools=WEATHER_OPENAI
    )
    assert completion.choices[0].message.content == "Echo: tool said sunny"
    assert completion.choices[0].finish_reason == "stop"


def test_openai_models_list_validates(oai: openai.OpenAI) -> None:
    raw = oai.models.with_raw_response.list()
    assert_valid("openai.ListModelsResponse", raw.http_response.json())
    assert OPENAI_MODEL in [m.id for m in raw.parse()]


def test_openai_invalid_body_is_400_in_openai_shape(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=OPENAI_MODEL, messages=[])
    assert_valid("openai.ErrorResponse", info.value.response.json())
    assert info.value.code == "empty_array" and info.value.param == "messages"


def test_openai_wrong_api_key_is_401(oai: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fake_openai.api_key = "sk-right"
    with pytest.raises(openai.AuthenticationError) as info:
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi"))
    assert info.value.code == "invalid_api_key"


def test_openai_records_each_request(oai: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("hi"), extra_headers={"X-Trace": "t1"}
    )
    (request,) = fake_openai.requests
    assert (request.method, request.path, request.outcome) == ("POST", "/v1/chat/completions", "ok")
    assert (
        request.headers["authorization"] == "Bearer sk-test" and request.headers["x-trace"] == "t1"
    )
    assert request.body["messages"] == user("hi")
    fake_openai.reset()
    assert fake_openai.requests == []


# -- OpenAI: faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
        (529, openai.InternalServerError),
    ],
)
def test_openai_status_fault_from_directive(
    oai: openai.OpenAI, status: int, exc: type[Exception]
) -> None:
    with pytest.raises(exc) as info:
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user(f"hi [[fault:{status}]]"))
    response = info.value.response  # type: ignore[attr-defined]
    assert response.status_code == status
    assert REQUEST_ID.match(response.headers["x-request-id"])
    assert_valid("openai.ErrorResponse", response.json())
    if status == 429:
        assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == (
            "1",
            "1000",
        )


def test_openai_fault_header_and_server_wide_fault_with_count(
    oai: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(
            model=OPENAI_MODEL, messages=user("hi"), extra_headers={"X-Fake-Fault": "503"}
        )
    fake_openai.fault, fake_openai.fault_times = "429", 2
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi"))
    assert (
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi"))
        .choices[0]
        .message.content
        == "Echo: hi"
    )
    assert [r.outcome for r in fake_openai.requests] == [
        "status:503",
        "status:429",
        "status:429",
        "ok",
    ]


def test_openai_timeout_fault_outlasts_the_client_timeout(
    oai: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.3).chat.completions.create(
            model=OPENAI_MODEL, messages=user("hi [[fault:timeout]]")
        )
    deadline = time.monotonic() + 2
    while fake_openai.requests[-1].outcome == "pending" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_openai.requests[-1].outcome == "disconnected"


def test_openai_slow_first_byte_and_delay(oai: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fake_openai.delay = 0.1
    started = time.perf_counter()
    oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("hi [[fault:slow_first_byte:150]]")
    )
    assert time.perf_counter() - started >= 0.25


def test_openai_drip_spaces_stream_chunks(oai: openai.OpenAI) -> None:
    arrivals = [
        time.perf_counter()
        for _ in oai.chat.completions.create(
            model=OPENAI_MODEL, messages=user("hi [[fault:drip:40]]"), stream=True
        )
    ]
    assert len(arrivals) == 7
    assert arrivals[-1] - arrivals[0] >= 5 * 0.04 * 0.9


def test_openai_cut_stream_raises_after_k_chunks(
    oai: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(
            model=OPENAI_MODEL, messages=user("hi [[fault:cut:3]]"), stream=True
        ):
            received.append(chunk)
    assert len(received) == 3
    assert fake_openai.requests[-1].outcome == "cut"


def test_openai_cut_non_stream_body_raises(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi [[fault:cut:0]]"))


def test_openai_malformed_json_and_sse(oai: openai.OpenAI) -> None:
    with pytest.raises(json.JSONDecodeError):
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi [[fault:malformed]]"))
    with pytest.raises(json.JSONDecodeError):
        list(
            oai.chat.completions.create(
                model=OPENAI_MODEL, messages=user("hi [[fault:malformed]]"), stream=True
            )
        )


def test_openai_stream_error_event_raises_api_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError, match="server had an error"):
        list(
            oai.chat.completions.create(
                model=OPENAI_MODEL, messages=user("hi [[fault:stream_error:2]]"), stream=True
            )
        )


def test_openai_empty_fault_returns_empty_content(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=OPENAI_MODEL, messages=user("hi [[fault:empty]]")
    )
    assert_valid("openai.CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert completion.choices[0].message.content == ""
    assert completion.usage is not None and completion.usage.completion_tokens == 0


def test_unknown_fault_kind_is_refused_loudly(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown fault kind"):
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user("hi [[fault:explode]]"))


def test_fifty_delayed_requests_are_served_concurrently(fake_openai: FakeOpenAI) -> None:
    fake_openai.delay = 0.5

    async def burst() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=fake_openai.sdk_base_url, api_key="x", max_retries=0, timeout=5
        )
        async with client:
            done = await asyncio.gather(
                *(
                    client.chat.completions.create(model=OPENAI_MODEL, messages=user(f"n{i}"))
                    for i in range(50)
                )
            )
        return [c.choices[0].message.content or "" for c in done]

    started = time.perf_counter()
    contents = asyncio.run(burst())
    assert time.perf_counter() - started < 1.5
    assert sorted(contents) == sorted(f"Echo: n{i}" for i in range(50))
    assert fake_openai.peak_in_flight == 50


def test_a_hang_up_noticed_after_a_reset_counts_for_no_test(oai: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    """The server thread may notice a client gone only after the next test's reset; that
    hang-up belongs to the earlier test and must not show in the next one's count."""
    stream = oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("hi [[fault:drip:50]]"), stream=True
    )
    next(iter(stream))
    earlier = fake_openai.requests[-1]
    fake_openai.reset()  # what the next test's fixture does
    stream.close()
    deadline = time.monotonic() + 2
    while earlier.outcome == "pending" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert earlier.outcome == "disconnected"
    assert fake_openai.disconnects == 0 and fake_openai.requests == []


def test_client_dropping_mid_stream_is_quiet(
    oai: openai.OpenAI, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    stream = oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("hi [[fault:drip:50]]"), stream=True
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 2
    while fake_openai.requests[-1].outcome == "pending" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_openai.requests[-1].outcome == "disconnected" and fake_openai.disconnects == 1
    assert (
        oai.chat.completions.create(model=OPENAI_MODEL, messages=user("still up"))
        .choices[0]
        .message.content
        == "Echo: still up"
    )
    assert [
        r.getMessage() for r in caplog.records if r.name.startswith(("aiohttp", "asyncio"))
    ] == []


def test_stop_cancels_a_hanging_request_promptly() -> None:
    server = FakeOpenAI(fault="timeout").start()
    client = openai.OpenAI(base_url=server.sdk_base_url, api_key="x", max_retries=0, timeout=10)
    errors: list[Exception] = []

    def call() -> None:
        try:
            client.chat.completions.create(model=OPENAI_MODEL, messages=user("hi"))
        except Exception as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while not server.in_flight:
        time.sleep(0.01)
    started = time.perf_counter()
    server.stop()
    caller.join(5)
    assert time.perf_counter() - started < 2
    assert len(errors) == 1 and isinstance(errors[0], openai.APIConnectionError)
    assert server.requests[0].outcome == "cancelled"


# -- Anthropic: answers ---------------------------------------------------------------------


def test_anthropic_message_echoes_and_validates(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=100, system="be brief", messages=user("hello big world")
    )
    body = raw.http_response.json()
    assert_valid("anthropic.Message", body)
    assert REQUEST_ID.match(raw.headers["request-id"])
    message = raw.parse()
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert [(b.type, b.text) for b in message.content] == [("text", "Echo: hello big world")]  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2 + 3 + 3, 5)
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (
        0,
        0,
    )


def test_anthropic_stream_events_validate_in_anthropic_order(claude: anthropic.Anthropic) -> None:
    headers, events = anthropic_raw_stream(
        claude, model=CLAUDE, max_tokens=100, messages=user("stream me")
    )
    assert REQUEST_ID.match(headers["request-id"])
    payloads = [json.loads(data) for _, data in events]
    for (name, _), payload in zip(events, payloads, strict=True):
        assert name == payload["type"]
        assert_valid("anthropic.MessageStreamEvent", payload)
    assert [p["type"] for p in payloads] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "".join(p["delta"]["text"] for p in payloads[3:8]) == "Echo: stream me"
    assert payloads[-2]["delta"]["stop_reason"] == "end_turn"
    assert payloads[-2]["usage"]["output_tokens"] == 5


def test_anthropic_sdk_stream_helper_builds_final_message(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=CLAUDE, max_tokens=100, messages=user("abc def [[cache:7,3]]")
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: abc def"
    assert final.usage.output_tokens == 5
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (7, 3)


def test_anthropic_tool_use_from_directive(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model=CLAUDE,
        max_tokens=100,
        messages=user("weather in Paris [[tool:get_weather]]"),
        tools=WEATHER_ANTHROPIC,
    )
    assert_valid("anthropic.Message", raw.http_response.json())
    message = raw.parse()
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert (block.name, block.input) == ("get_weather", {"q": "weather in Paris"})


def test_anthropic_tool_use_streams_input_json_deltas(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 100,
        "messages": user("weather in Paris"),
        "tools": WEATHER_ANTHROPIC,
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    _, events = anthropic_raw_stream(claude, **kwargs)
    payloads = [json.loads(data) for _, data in events]
    for payload in payloads:
        assert_valid("anthropic.MessageStreamEvent", payload)
    start = payloads[1]["content_block"]
    assert (start["type"], start["name"], start["input"]) == ("tool_use", "get_weather", {})
    fragments = [p["delta"]["partial_json"] for p in payloads if p["type"] == "content_block_delta"]
    assert len(fragments) > 2 and json.loads("".join(fragments)) == {"q": "weather in Paris"}
    assert payloads[-2]["delta"]["stop_reason"] == "tool_use"

    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == {"q": "weather in Paris"}  # type: ignore[union-attr]


def test_anthropic_tool_result_is_echoed(claude: anthropic.Anthropic) -> None:
    messages: Any = [
        {"role": "user", "content": "weather? [[tool:get_weather]]"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    message = claude.messages.create(
        model=CLAUDE, max_tokens=100, messages=messages, tools=WEATHER_ANTHROPIC
    )
    assert message.content[0].text == "Echo: tool said sunny"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("directive", "stop_sequences", "reason", "sequence"),
    [
        ("[[stop:max_tokens]]", None, "max_tokens", None),
        ("[[stop:stop_sequence]]", ["END"], "stop_sequence", "END"),
    ],
)
def test_anthropic_stop_directives(
    claude: anthropic.Anthropic,
    directive: str,
    stop_sequences: list[str] | None,
    reason: str,
    sequence: str | None,
) -> None:
    extra: dict[str, Any] = {"stop_sequences": stop_sequences} if stop_sequences else {}
    message = claude.messages.create(
        model=CLAUDE, max_tokens=100, messages=user(f"hi {directive}"), **extra
    )
    assert (message.stop_reason, message.stop_sequence) == (reason, sequence)


def test_anthropic_stop_sequence_in_reply_cuts_it(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CLAUDE, max_tokens=100, messages=user("one two three"), stop_sequences=["two"]
    )
    assert message.content[0].text == "Echo: one "  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "two")


def test_anthropic_max_tokens_truncates(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=CLAUDE, max_tokens=2, messages=user("hello world"))
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2


def test_anthropic_missing_max_tokens_is_400(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.post("/v1/messages", body={"model": CLAUDE, "messages": user("hi")}, cast_to=object)
    body = info.value.response.json()
    assert_valid("anthropic.ErrorResponse", body)
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }


def test_anthropic_system_role_inside_messages_is_400(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "system", "content": "x"}, *user("hi")]
    with pytest.raises(anthropic.BadRequestError, match="top-level `system` parameter"):
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=messages)  # type: ignore[arg-type]


def test_anthropic_requires_version_header(fake_anthropic: FakeAnthropic) -> None:
    response = httpx2.post(
        f"{fake_anthropic.base_url}/messages",
        headers={"x-api-key": "k"},
        json={"model": CLAUDE, "max_tokens": 5, "messages": user("hi")},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "anthropic-version: header is required"


def test_anthropic_models_and_count_tokens(claude: anthropic.Anthropic) -> None:
    raw = claude.models.with_raw_response.list()
    assert_valid("anthropic.ListModelsResponse", raw.http_response.json())
    assert CLAUDE in [m.id for m in raw.parse()]
    counted = claude.messages.count_tokens(
        model=CLAUDE, system="be brief", messages=user("one two three")
    )
    assert counted.input_tokens == 2 + 3 + 3


# -- Anthropic: faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (502, anthropic.InternalServerError, "api_error"),
        (503, anthropic.ServiceUnavailableError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_anthropic_status_fault_from_header(
    claude: anthropic.Anthropic, status: int, exc: type[Exception], error_type: str
) -> None:
    with pytest.raises(exc) as info:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=10,
            messages=user("hi"),
            extra_headers={"X-Fake-Fault": str(status)},
        )
    response = info.value.response  # type: ignore[attr-defined]
    assert response.status_code == status
    body = response.json()
    assert_valid("anthropic.ErrorResponse", body)
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    if status == 429:
        assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == (
            "1",
            "1000",
        )


def test_anthropic_timeout_fault(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APITimeoutError):
        claude.with_options(timeout=0.3).messages.create(
            model=CLAUDE, max_tokens=10, messages=user("hi [[fault:timeout]]")
        )


def test_anthropic_cut_stream_raises(
    claude: anthropic.Anthropic, fake_anthropic: FakeAnthropic
) -> None:
    received = []
    # The SDK lets httpx2's RemoteProtocolError escape a broken stream instead of wrapping it.
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        for event in claude.messages.create(
            model=CLAUDE, max_tokens=10, messages=user("hi [[fault:cut:4]]"), stream=True
        ):
            received.append(event.type)
    assert received == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]  # ping is skipped
    assert fake_anthropic.requests[-1].outcome == "cut"


def test_anthropic_malformed_json_and_sse(claude: anthropic.Anthropic) -> None:
    with pytest.raises(json.JSONDecodeError):
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=user("hi [[fault:malformed]]"))
    with pytest.raises(json.JSONDecodeError):
        list(
            claude.messages.create(
                model=CLAUDE, max_tokens=10, messages=user("hi [[fault:malformed]]"), stream=True
            )
        )


def test_anthropic_overloaded_error_event_mid_stream(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        list(
            claude.messages.create(
                model=CLAUDE,
                max_tokens=10,
                messages=user("hi [[fault:stream_error:3]]"),
                stream=True,
            )
        )


def test_anthropic_empty_fault_has_no_content_blocks(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=10, messages=user("hi [[fault:empty]]")
    )
    assert_valid("anthropic.Message", raw.http_response.json())
    assert raw.parse().content == []
    _, events = anthropic_raw_stream(
        claude, model=CLAUDE, max_tokens=10, messages=user("hi [[fault:empty]]")
    )
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "message_delta",
        "message_stop",
    ]


def test_anthropic_drip_spaces_events(
    claude: anthropic.Anthropic, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.fault = "drip:30"
    started = time.perf_counter()
    with claude.messages.stream(model=CLAUDE, max_tokens=10, messages=user("hi")) as stream:
        assert "".join(stream.text_stream) == "Echo: hi"
    assert time.perf_counter() - started >= 10 * 0.03 * 0.9


# -- shapes a gateway must also handle -------------------------------------------------------


def test_openai_stream_with_n_interleaves_choices(oai: openai.OpenAI) -> None:
    _, events = openai_raw_stream(oai, model=OPENAI_MODEL, messages=user("hi"), n=2)
    chunks = [json.loads(data) for _, data in events[:-1]]
    for chunk in chunks:
        assert_valid("openai.CreateChatCompletionStreamResponse", chunk)
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert indexes[:4] == [0, 1, 0, 1]
    for index in (0, 1):
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in chunks
            if c["choices"][0]["index"] == index
        )
        assert text == "Echo: hi"


def test_openai_parallel_tool_calls_from_two_directives(oai: openai.OpenAI) -> None:
    tools: Any = [*WEATHER_OPENAI, {"type": "function", "function": {"name": "get_time"}}]
    prompt = user("Paris [[tool:get_weather]] [[tool:get_time]]")
    _, events = openai_raw_stream(oai, model=OPENAI_MODEL, messages=prompt, tools=tools)
    chunks = [json.loads(data) for _, data in events[:-1]]
    for chunk in chunks:
        assert_valid("openai.CreateChatCompletionStreamResponse", chunk)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for call in chunk["choices"][0]["delta"].get("tool_calls") or []:
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call["function"].get("name", "")
            entry["arguments"] += call["function"].get("arguments", "")
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert all(json.loads(c["arguments"]) == {"q": "Paris"} for c in calls.values())


def test_chunks_directive_sets_the_number_of_deltas(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    stream = oai.chat.completions.create(
        model=OPENAI_MODEL, messages=user("a b c d e f [[chunks:12]]"), stream=True
    )
    contents = [c.choices[0].delta.content for c in stream if c.choices[0].delta.content]
    assert len(contents) == 12 and "".join(contents) == "Echo: a b c d e f"
    message = claude.messages.create(
        model=CLAUDE, max_tokens=100, messages=user("a b c d e f [[chunks:12]]")
    )
    assert message.usage.output_tokens == 12
