"""An OpenAI-SDK client talks to an Anthropic-backed model through the platform."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import schema, usage_row

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def test_text_answer_usage_and_cache_tokens_are_mapped(client, fake_anthropic, fakes_reset, committed_db):

    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet", max_tokens=64,
        messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi claude [[cache:7,3]]"}])
    jsonschema.validate(raw.http_response.json(), schema("openai.CreateChatCompletionResponse"))
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Echo: hi claude")
    assert completion.choices[0].finish_reason == "stop"
    sent = fake_anthropic.last_request.body
    assert sent["system"] == "be nice" and sent["max_tokens"] == 64 and sent["model"] == "claude-sonnet-4-5"
    assert completion.usage.prompt_tokens_details.cached_tokens == 7
    row = usage_row(raw.headers["x-request-id"])
    assert (row.cached_tokens, row.cache_creation_tokens) == (7, 3) and row.provider == "anthropic"


@pytest.mark.parametrize("directive, finish", [("[[stop:max_tokens]]", "length"), ("[[stop:stop_sequence]]", "stop")])
def test_stop_reasons_become_openai_finish_reasons(client, fakes_reset, directive, finish):
    completion = client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": f"x {directive}"}])
    assert completion.choices[0].finish_reason == finish


def test_tool_use_streams_as_openai_tool_calls(client, fakes_reset):
    stream = client.chat.completions.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "find it [[tool:lookup]]"}], tools=[TOOL],
        stream=True, stream_options={"include_usage": True})
    name, arguments, finish, usage = None, "", None, None
    for chunk in stream:
        jsonschema.validate(chunk.model_dump(exclude_unset=True), schema("openai.CreateChatCompletionStreamResponse"))
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                name = name or delta.function.name
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "lookup" and finish == "tool_calls" and isinstance(json.loads(arguments), dict)
    assert usage.completion_tokens > 0


def test_tool_results_go_back_to_anthropic_as_tool_result_blocks(client, fake_anthropic, fakes_reset):
    first = client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "find [[tool:lookup]]"}], tools=[TOOL])
    call = first.choices[0].message.tool_calls[0]
    client.chat.completions.create(model="claude-sonnet", tools=[TOOL], messages=[
        {"role": "user", "content": "find"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ])
    sent = fake_anthropic.last_request.body["messages"]
    assert sent[1]["content"][0]["type"] == "tool_use" and sent[1]["content"][0]["id"] == call.id
    assert sent[2]["role"] == "user" and sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id, "content": "42"}


def test_anthropic_overload_is_a_retryable_502(client, fakes_reset):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "x [[fault:529]]"}])
    assert caught.value.status_code == 502 and caught.value.response.headers["retry-after"]
