"""Through the platform to an OpenAI-compatible upstream (fake, real HTTP), driven by the SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from decimal import Decimal

import aiohttp
import jsonschema
import openai
import pytest

from tests.conftest import drain_usage, schema, usage_row

STREAM_SCHEMA = schema("openai.CreateChatCompletionStreamResponse")
RESPONSE_SCHEMA = schema("openai.CreateChatCompletionResponse")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def sse_events(body: str) -> list[tuple[int | None, str]]:
    """(id, data) of each SSE event."""
    events = []
    for block in body.split("\n\n"):
        ident, data = None, None
        for line in block.split("\n"):
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            events.append((ident, data))
    return events


def test_non_streaming_answer_params_and_cost(client, fake_openai, fakes_reset, committed_db):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        temperature=0.5, seed=7, stop=["zzz"], max_tokens=50, frequency_penalty=0.1,
        extra_body={"not_a_real_param": 1},
    )
    jsonschema.validate(raw.http_response.json(), RESPONSE_SCHEMA)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Echo: hello there")
    sent = fake_openai.last_request
    assert {k.lower(): v for k, v in sent.headers.items()}["authorization"] == "Bearer sk-fake-upstream-credential-123456"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["temperature"] == 0.5
    assert sent.body["seed"] == 7 and sent.body["stop"] == ["zzz"] and sent.body["max_tokens"] == 50
    assert "not_a_real_param" not in sent.body
    assert raw.headers["x-upstream-model"] == completion.model
    row = usage_row(raw.headers["x-request-id"])
    usage = completion.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    expected = (Decimal(usage.prompt_tokens - cached) * Decimal("0.15") + Decimal(cached) * Decimal("0.075")
                + Decimal(usage.completion_tokens) * Decimal("0.60")) / Decimal(1_000_000)
    assert row.cost_usd == expected and row.cost_usd > 0
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert row.provider_request_id.startswith("req_") and row.upstream_model == completion.model


def test_stream_is_forwarded_chunk_by_chunk_with_usage_when_asked(client, fake_openai, fakes_reset, committed_db):
    response = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream me"}], stream=True,
        stream_options={"include_usage": True},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    chunks = list(response.parse())
    for chunk in chunks:
        jsonschema.validate(chunk.model_dump(exclude_unset=True), STREAM_SCHEMA)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Echo: stream me")
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert fake_openai.last_request.body["stream_options"] == {"include_usage": True}
    row = usage_row(response.headers["x-request-id"])
    assert row.stream and not row.partial and row.completion_tokens == chunks[-1].usage.completion_tokens


def test_usage_chunk_is_withheld_unless_asked_but_still_recorded(client, fakes_reset, committed_db):
    response = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "no usage please"}], stream=True)
    chunks = list(response.parse())
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"
    assert usage_row(response.headers["x-request-id"]).completion_tokens > 0


def test_tool_calls_come_back_in_openai_shape(client, fakes_reset):
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "weather? [[tool:get_weather]]"}], tools=[WEATHER_TOOL])
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


def test_tool_calls_stream_in_openai_shape(client, fakes_reset):
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "weather? [[tool:get_weather]]"}],
        tools=[WEATHER_TOOL], stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        jsonschema.validate(chunk.model_dump(exclude_unset=True), STREAM_SCHEMA)
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                name = name or delta.function.name
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls" and isinstance(json.loads(arguments), dict)


def test_upstream_429_is_a_429_with_retry_after(client, fakes_reset):
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x [[fault:429]]"}])
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "upstream_rate_limited"


def test_upstream_500_is_an_honest_502(client, fakes_reset, committed_db):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x [[fault:500]]"}])
    assert caught.value.status_code == 502 and caught.value.response.headers.get("retry-after")
    row = usage_row(caught.value.response.headers["x-request-id"])
    assert row.http_status == 502 and row.error_code == "upstream_unavailable" and row.cost_usd == 0


def test_stream_cut_midway_ends_with_an_error_event(server, tenant, fakes_reset, committed_db):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {tenant[2]}"},
                                    json={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "a b c d e f [[fault:cut:3]]"}]}) as response:
                assert response.status == 200
                return response.headers["x-request-id"], (await response.read()).decode()

    request_id, body = asyncio.run(run())
    events = [data for _, data in sse_events(body)]
    assert events[-1] != "[DONE]"
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_cut"
    row = usage_row(request_id)
    assert row.partial and row.http_status == 502 and row.completion_tokens > 0


def test_sdk_surfaces_a_mid_stream_error(client, fakes_reset):
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c [[fault:cut:2]]"}], stream=True)
    with pytest.raises(openai.APIError):
        list(stream)


def test_fifty_slow_upstream_calls_run_concurrently(server, tenant, fake_openai, fakes_reset):
    fake_openai.delay = 1.0
    async def run():
        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {tenant[2]}"},
                                        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow"}]}) as response:
                    await response.read()
                    return response.status
            started = time.perf_counter()
            statuses = await asyncio.gather(*(one() for _ in range(50)))
            return statuses, time.perf_counter() - started

    statuses, took = asyncio.run(run())
    assert statuses == [200] * 50
    assert took < 3.0, f"50 concurrent 1 s calls took {took:.2f} s"
    assert fake_openai.peak_in_flight >= 40


def test_client_disconnect_mid_stream_still_records_usage(server, tenant, committed_db):
    """The built-in model streams slowly (50 tokens/s); we hang up after two chunks."""
    async def run():
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {tenant[2]}"},
                                          json={"model": "local-slow", "stream": True, "messages": [{"role": "user", "content": "tell me a long story " * 5}]})
            request_id = response.headers["x-request-id"]
            seen = 0
            async for line in response.content:
                if line.startswith(b"data: "):
                    seen += 1
                if seen == 3:
                    break
            response.close()
            return request_id

    request_id = asyncio.run(run())
    from billing.models import UsageRecord

    deadline = time.monotonic() + 5
    while not UsageRecord.objects.filter(request_id=request_id).exists():
        drain_usage()
        assert time.monotonic() < deadline, "no usage row after the client hung up"
        time.sleep(0.1)
    row = UsageRecord.objects.get(request_id=request_id)
    assert row.http_status == 499 and row.error_code == "client_disconnected" and row.partial
    assert row.prompt_tokens > 0 and 1 <= row.completion_tokens < 30


def test_a_client_hanging_up_a_whole_answer_releases_its_slot_and_records_a_partial_row(server, tenants):
    """Through the REST door: the hang-up cancels the call (the session's cancel token)."""
    from llm_platform.redis import get_redis

    tenant, _, secret = tenants.make(tier={"max_concurrent": 3})  # small: one slot per request
    slots = f"gw:{{t{tenant.pk}}}:conc"

    async def run():
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.post(
                f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                json={"model": "local-slow", "messages": [{"role": "user", "content": "tell me a long story " * 5}]}))
            deadline = time.monotonic() + 5
            while not get_redis().zcard(slots):  # admitted, the provider is generating
                assert time.monotonic() < deadline, "the call never took its slot"
                await asyncio.sleep(0.02)
            request.cancel()  # the client hangs up before the answer
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(run())
    from billing.models import UsageRecord

    deadline = time.monotonic() + 5
    while not UsageRecord.objects.filter(tenant=tenant).exists():
        drain_usage()
        assert time.monotonic() < deadline, "no usage row after the client hung up"
    row = UsageRecord.objects.get(tenant=tenant)
    assert row.http_status == 499 and row.error_code == "client_disconnected" and row.partial
    assert row.prompt_tokens > 0
    assert get_redis().zcard(slots) == 0
