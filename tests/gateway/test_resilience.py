"""Provider faults become a correct answer from another lane, or an honest, structured error."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from tests.conftest import Server, drain_usage, usage_row


def sdk(server, secret, **kwargs):
    return openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0, timeout=30, **kwargs)


def ask(server, secret, model, content="hello", **extra):
    return sdk(server, secret).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], **extra)


def calls_to(fake, model: str) -> int:
    return sum(1 for r in fake.requests if isinstance(r.body, dict) and r.body.get("model") == model)


def test_a_5xx_is_retried_and_counted(server, tenant, fake_openai, fakes_reset, committed_db):

    fake_openai.fault, fake_openai.fault_times = "500", 1
    response = ask(server, tenant[2], "gpt-4o-mini")
    assert response.http_response.status_code == 200 and response.headers["x-gateway-retries"] == "1"
    assert calls_to(fake_openai, "gpt-4o-mini") == 2
    assert usage_row(response.headers["x-request-id"]).retries == 1


@pytest.mark.parametrize("fault", ["400", "422"])
def test_a_client_error_from_the_provider_is_not_retried(server, tenant, fake_openai, fakes_reset, fault):
    fake_openai.fault = fault
    with pytest.raises(openai.BadRequestError):
        ask(server, tenant[2], "gpt-4o-mini")
    assert calls_to(fake_openai, "gpt-4o-mini") == 1


def test_openai_lane_failing_falls_back_to_anthropic(server, tenant, fake_openai, fake_anthropic, fakes_reset):
    fake_openai.fault = "503"
    response = ask(server, tenant[2], "fallback-openai-first", "hi there")
    completion = response.parse()
    assert response.headers["x-upstream-provider"] == "anthropic"
    assert completion.model == "fb-claude" and completion.choices[0].message.content.startswith("Echo: hi there")
    assert calls_to(fake_openai, "fb-openai") == 1 and len(fake_anthropic.requests) == 1


def test_anthropic_overload_falls_back_to_openai_also_when_streaming(server, tenant, fake_openai, fake_anthropic, fakes_reset):
    fake_anthropic.fault = "529"
    stream = sdk(server, tenant[2]).chat.completions.create(
        model="fallback-anthropic-first", messages=[{"role": "user", "content": "stream it"}], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Echo: stream it")
    assert chunks[0].model == "fb2-openai"


def test_a_429_holds_the_lane_for_every_process(routes, server, tenant, fake_openai, fake_anthropic, fakes_reset):
    other = Server()
    fake_openai.fault, fake_openai.fault_times = "429:5000", 1
    first = ask(server, tenant[2], "fallback-openai-first")
    assert first.headers["x-upstream-provider"] == "anthropic"
    try:
        second = ask(other, tenant[2], "fallback-openai-first")
    finally:
        other.stop()
    assert second.headers["x-upstream-provider"] == "anthropic"
    assert calls_to(fake_openai, "fb-openai") == 1  # the held lane was not called again


def test_breaker_opens_is_shared_across_processes_and_closes_after_probes(routes, server, tenant, fake_openai, fakes_reset, committed_db):
    from gateway.models import BreakerEvent

    other = Server()
    ask(other, tenant[2], "local")  # warm the second process (route table, key cache)
    fake_openai.fault = "500"
    for _ in range(4):
        with pytest.raises(openai.InternalServerError):
            ask(server, tenant[2], "flaky")
    assert calls_to(fake_openai, "flaky-model") == 4
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            ask(other, tenant[2], "flaky")
        assert time.monotonic() - started < 0.5
        assert caught.value.status_code == 503 and caught.value.body["code"] == "all_lanes_unavailable"
        assert "circuit open" in caught.value.body["message"] and caught.value.response.headers["retry-after"]
        assert calls_to(fake_openai, "flaky-model") == 4  # the open breaker kept the call away
        fake_openai.fault = None
        time.sleep(1.6)  # the cool-down
        assert ask(other, tenant[2], "flaky").http_response.status_code == 200  # a half-open probe
        assert ask(server, tenant[2], "flaky").http_response.status_code == 200  # closes after 2
    finally:
        other.stop()
    drain_usage()
    transitions = [(e.from_state, e.to_state) for e in BreakerEvent.objects.filter(lane="openai-compatible:flaky-model").order_by("at", "id")]
    assert transitions[-3:] == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert "4 of 4 calls failed" in BreakerEvent.objects.filter(lane="openai-compatible:flaky-model", to_state="open").first().reason


def test_slow_calls_open_the_breaker(server, tenant, fake_openai, fakes_reset, committed_db):
    from gateway.models import BreakerEvent

    fake_openai.delay = 0.2
    for _ in range(3):
        assert ask(server, tenant[2], "brownout").http_response.status_code == 200
    fake_openai.delay = 0
    with pytest.raises(openai.InternalServerError) as caught:
        ask(server, tenant[2], "brownout")
    assert caught.value.status_code == 503
    drain_usage()
    assert BreakerEvent.objects.filter(lane="openai-compatible:brownout-model", to_state="open", reason__startswith="slow calls").exists()


def test_refused_connection_on_the_primary_falls_back(server, tenant, fakes_reset):
    response = ask(server, tenant[2], "dead-primary")
    assert response.http_response.status_code == 200 and response.parse().model == "alive-model"
    assert response.headers["x-gateway-retries"] == "2"  # one retry on the dead lane, then the next lane


def test_a_slow_first_byte_hits_the_lane_deadline(server, tenant, fake_openai, fakes_reset):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        ask(server, tenant[2], "slowpoke", "x [[fault:slow_first_byte:3000]]")
    assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5


def test_a_silent_stream_hits_the_idle_timeout(server, tenant, fakes_reset):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {tenant[2]}"},
                                    json={"model": "slowpoke", "stream": True,
                                          "messages": [{"role": "user", "content": "a b c d [[fault:drip:800]]"}]}) as response:
                return response.status, (await response.read()).decode()

    status, body = asyncio.run(run())
    last = [line for line in body.splitlines() if line.startswith("data: ")][-1]
    assert status == 200 and json.loads(last[6:])["error"]["code"] in ("upstream_idle_timeout", "upstream_timeout")


def test_a_lane_upstream_budget_is_never_oversubscribed(server, tenant, fake_openai, fakes_reset):
    providers = [ask(server, tenant[2], "budgeted").headers["x-upstream-provider"] for _ in range(4)]
    assert providers[:2] == ["openai-compatible", "openai-compatible"] and providers[2:] == ["local", "local"]
    assert calls_to(fake_openai, "budget-model") == 2


def test_status_shows_each_lanes_breaker(server, tenant, fake_openai, fakes_reset, committed_db):
    from django.contrib.auth.models import User
    from django.test import Client

    fake_openai.fault = "500"
    for _ in range(4):
        with pytest.raises(openai.InternalServerError):
            ask(server, tenant[2], "flaky")
    admin = User.objects.filter(username="breakeradmin").first() or User.objects.create_superuser("breakeradmin", "b@c.d", "pw-123456789")
    browser = Client()
    browser.force_login(admin)
    lanes = {lane["model"]: lane for lane in browser.get("/status").json()["lanes"]}
    assert lanes["flaky"]["breaker"]["state"] == "open" and "calls failed" in lanes["flaky"]["breaker"]["reason"]
    assert lanes["local"]["breaker"]["state"] == "closed"


def test_a_lost_stream_resumes_from_last_event_id_without_a_second_call(server, tenant, fake_openai, fakes_reset):
    fake_openai.chunks = 8

    async def run():
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {tenant[2]}", "X-Stream-Resumable": "true"}
            body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "one two three four five six seven [[fault:drip:150]]"}]}
            response = await session.post(f"{server.base_url}/chat/completions", headers=headers, json=body)
            stream_id = response.headers["x-stream-id"]
            seen = []
            async for line in response.content:
                if line.startswith(b"id: "):
                    seen.append(int(line[4:]))
                if line.startswith(b"data: ") and len(seen) == 3:
                    first_part = seen
                    break
            response.close()  # the connection is lost
            await asyncio.sleep(0.2)
            resumed = await session.get(f"{server.base_url}/streams/{stream_id}",
                                        headers={"Authorization": f"Bearer {tenant[2]}", "Last-Event-ID": str(first_part[-1])})
            return first_part, resumed.status, (await resumed.read()).decode()

    first_ids, status, rest = asyncio.run(run())
    ids = [int(line[4:]) for line in rest.splitlines() if line.startswith("id: ")]
    assert status == 200 and first_ids == [1, 2, 3]
    assert ids[0] == 4 and ids == sorted(set(ids))  # no duplicates, nothing missing
    data = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert calls_to(fake_openai, "gpt-4o-mini") == 1


def test_resume_of_another_tenants_stream_is_404(server, tenants, fakes_reset):
    _, _, owner = tenants.make()
    _, _, stranger = tenants.make()
    response = sdk(server, owner).chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "x"}], stream=True,
        extra_headers={"X-Stream-Resumable": "true"})
    list(response.parse())
    stream_id = response.headers["x-stream-id"]
    with pytest.raises(openai.NotFoundError):
        sdk(server, stranger).get(f"/streams/{stream_id}", cast_to=object)


def test_invalid_structured_output_gets_one_repair_then_502(server, tenant, fake_openai, fakes_reset, committed_db):

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    with pytest.raises(openai.InternalServerError) as caught:
        ask(server, tenant[2], "gpt-4o-mini", "give json",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}})
    assert caught.value.status_code == 502 and caught.value.body["code"] == "structured_output_invalid"
    assert "not valid JSON" in caught.value.body["message"]
    assert calls_to(fake_openai, "gpt-4o-mini") == 2
    repair = fake_openai.requests[-1].body["messages"]
    assert repair[-2]["role"] == "assistant" and "not valid JSON" in repair[-1]["content"]
    row = usage_row(caught.value.response.headers["x-request-id"])
    assert row.http_status == 502 and row.retries == 0 and row.prompt_tokens > 0


@pytest.mark.parametrize("fault, status, code", [
    ("502", 502, "upstream_unavailable"),
    ("503", 502, "upstream_unavailable"),
    ("malformed", 502, "upstream_malformed"),
])
def test_each_provider_fault_is_retried_then_an_honest_error(server, tenant, fake_openai, fakes_reset, fault, status, code):
    fake_openai.fault = fault
    with pytest.raises(openai.APIStatusError) as caught:
        ask(server, tenant[2], "gpt-4o-mini")
    assert caught.value.status_code == status and caught.value.body["code"] == code
    assert calls_to(fake_openai, "gpt-4o-mini") == 3  # max_attempts, then the honest error


@pytest.mark.parametrize("fault", ["cut:0", "503"])
def test_a_stream_failing_before_its_first_byte_is_retried(server, tenant, fake_openai, fakes_reset, fault):
    fake_openai.fault, fake_openai.fault_times = fault, 1
    stream = sdk(server, tenant[2]).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "retry me"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Echo: retry me") and calls_to(fake_openai, "gpt-4o-mini") == 2


def test_an_empty_answer_is_passed_through_honestly(server, tenant, fake_openai, fakes_reset):
    fake_openai.fault = "empty"
    completion = ask(server, tenant[2], "gpt-4o-mini").parse()
    assert completion.choices[0].message.content in ("", None)
