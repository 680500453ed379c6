"""The official openai SDK, pointed at the running platform, chats with the built-in model."""

from __future__ import annotations

import jsonschema
import pytest

from tests.conftest import drain_usage, schema

EXPECTED = "Hello from the built-in local model. You said: Hi there"


def test_non_streaming_chat_returns_the_local_reply_in_openai_shape(client):
    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "Hi there"}]
    )
    completion = raw.parse()
    jsonschema.validate(raw.http_response.json(), schema("openai.CreateChatCompletionResponse"))
    assert completion.choices[0].message.content == EXPECTED
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0
    assert completion._request_id and completion._request_id.startswith("req_")


def test_streaming_chat_sends_chunks_then_usage_then_done(client, server):
    stream = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hi there"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    validator = schema("openai.CreateChatCompletionStreamResponse")
    for chunk in chunks:
        jsonschema.validate(chunk.model_dump(exclude_unset=True), validator)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chunks) - 3


def test_models_list_names_the_local_model_as_built_in(client):
    models = {m.id: m for m in client.models.list()}
    assert models["local"].owned_by == "llm-platform (built-in)"
    assert "gpt-4o-mini" in models


def test_usage_row_is_written_for_a_call(client, committed_db):
    from billing.models import UsageRecord

    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "Hi there"}], user="end-user-7",
        extra_headers={"X-Feature": "search"},
    )
    request_id = raw.headers["x-request-id"]
    drain_usage()
    row = UsageRecord.objects.get(request_id=request_id)
    assert row.model == "local" and row.provider == "local"
    assert row.end_user == "end-user-7" and row.feature == "search"
    assert row.http_status == 200 and row.stream is False
    assert row.completion_tokens == raw.parse().usage.completion_tokens
