"""The OpenAI Responses API front door, driven by the official openai SDK."""

from __future__ import annotations

import jsonschema
import openai
import pytest

from tests.conftest import schema, usage_row

EXPECTED = "Hello from the built-in local model. You said: Hi there"


@pytest.fixture()
def sdk(server, tenants):
    _, _, secret = tenants.make()
    return openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)


def test_a_response_comes_back_in_the_responses_shape_and_is_billed_as_such(sdk):
    raw = sdk.responses.with_raw_response.create(model="local", input="Hi there", instructions="Be brief.")
    response = raw.parse()
    jsonschema.validate(raw.http_response.json(), schema("openai.Response"))
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text == EXPECTED
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0
    assert response.instructions == "Be brief."
    row = usage_row(raw.headers["x-request-id"])
    assert row.front_door == "responses" and row.http_status == 200


def test_a_streamed_response_sends_the_typed_events_in_order(sdk):
    events = list(sdk.responses.create(model="local", input="Hi there", stream=True))
    validator = schema("openai.ResponseStreamEvent")
    for event in events:
        jsonschema.validate(event.model_dump(mode="json", exclude_unset=True, by_alias=True), validator)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == EXPECTED
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == EXPECTED and events[-1].response.usage.output_tokens > 0


def test_a_follow_up_sent_the_moment_the_first_answer_ends_sees_it_on_a_non_openai_lane(sdk):
    first = sdk.responses.create(model="local", input="my name is Ada")
    second = sdk.responses.create(model="local", input="what is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The built-in model answers the last user turn; the stored conversation reached it too:
    items = sdk.responses.input_items.list(second.id)
    assert [item.content[0].text for item in items.data] == ["what is my name?"]
    assert second.usage.input_tokens > first.usage.input_tokens  # the history was sent along


def test_a_streamed_first_turn_is_stored_before_its_last_event(sdk):
    stream = sdk.responses.create(model="local", input="remember 42", stream=True)
    completed = [e for e in stream if e.type == "response.completed"][0]
    follow = sdk.responses.create(model="local", input="and now?", previous_response_id=completed.response.id)
    assert follow.status == "completed"


def test_responses_are_retrieved_and_deleted_by_their_tenant_only(sdk, server, tenants):
    created = sdk.responses.create(model="local", input="Hi there")
    assert sdk.responses.retrieve(created.id).output_text == EXPECTED
    _, _, other_secret = tenants.make()
    other = openai.OpenAI(base_url=server.base_url, api_key=other_secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model="local", input="hi", previous_response_id=created.id)
    assert caught.value.body["param"] == "previous_response_id"
    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)


def test_function_tools_round_trip_through_an_openai_compatible_lane(sdk, fakes_reset):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    response = sdk.responses.create(model="gpt-4o-mini", input="[[tool:get_weather]] weather in Paris?", tools=tools)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    follow = sdk.responses.create(model="gpt-4o-mini", previous_response_id=response.id, tools=tools, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}])
    assert follow.status == "completed" and follow.output_text


def test_bad_input_is_a_400_naming_the_field(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model="local", input=[{"type": "message", "role": "wizard", "content": "hi"}])
    assert caught.value.body["param"] == "input[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model="local", input="hi", tools=[{"type": "web_search"}])
    assert caught.value.body["param"] == "tools[0].type"


def test_a_client_hanging_up_a_streamed_response_cancels_it_and_records_a_partial_row(server, tenants):
    import asyncio
    import time

    import aiohttp

    from billing.models import UsageRecord
    from llm_platform.redis import get_redis
    from tests.conftest import drain_usage

    tenant, _, secret = tenants.make(tier={"max_concurrent": 3})  # small: one slot per request

    async def hang_up() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}/responses", headers={"Authorization": f"Bearer {secret}"},
                                    json={"model": "local-slow", "stream": True, "input": "tell me a story " * 20}) as response:
                deltas = 0
                async for line in response.content:
                    deltas += line.startswith(b"event: response.output_text.delta")
                    if deltas == 3:
                        return  # the client leaves mid-answer

    asyncio.run(hang_up())
    deadline = time.monotonic() + 5
    while not UsageRecord.objects.filter(tenant=tenant).exists():
        drain_usage()
        assert time.monotonic() < deadline, "no usage row after the client hung up"
    row = UsageRecord.objects.get(tenant=tenant)
    assert row.front_door == "responses" and row.http_status == 499 and row.partial
    assert 1 <= row.completion_tokens < 60
    assert get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc") == 0


def test_responses_past_their_retention_are_purged_and_fresh_ones_kept(sdk, committed_db):
    from datetime import UTC, datetime, timedelta

    from django.core.management import call_command

    from gateway.models import StoredResponse

    old, fresh = (sdk.responses.create(model="local", input="Hi there") for _ in range(2))
    StoredResponse.objects.filter(pk=old.id).update(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(openai.NotFoundError):  # expired: invisible at once
        sdk.responses.retrieve(old.id)
    call_command("purge_responses")
    assert not StoredResponse.objects.filter(pk=old.id).exists()
    assert sdk.responses.retrieve(fresh.id).id == fresh.id
