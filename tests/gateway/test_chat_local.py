"""The official openai SDK, pointed at the running platform, chats with the built-in model."""

from __future__ import annotations

import jsonschema
import pytest

from tests.conftest import drain_usage, schema, usage_row

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

    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "Hi there"}], user="end-user-7",
        extra_headers={"X-Feature": "search"},
    )
    request_id = raw.headers["x-request-id"]
    row = usage_row(request_id)
    assert row.model == "local" and row.provider == "local"
    assert row.end_user == "end-user-7" and row.feature == "search"
    assert row.http_status == 200 and row.stream is False
    assert row.completion_tokens == raw.parse().usage.completion_tokens


def test_prompts_and_answers_are_stored_only_when_the_tenant_opts_in(server, tenants, committed_db):
    import openai


    ids = {}
    for store in (False, True):
        _, _, secret = tenants.make(store_content=store)
        client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="local", messages=[{"role": "user", "content": "secret plan"}])
        ids[store] = raw.headers["x-request-id"]
    private, stored = (usage_row(ids[flag]) for flag in (False, True))
    assert private.prompt is None and private.completion == ""
    assert stored.prompt == [{"role": "user", "content": "secret plan"}]
    assert stored.completion == "Hello from the built-in local model. You said: secret plan"


def test_a_request_refused_at_validation_writes_no_row(server, tenant, committed_db):
    import openai

    from billing.models import UsageRecord

    client = openai.OpenAI(base_url=server.base_url, api_key=tenant[2], max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}], temperature=5)
    request_id = caught.value.response.headers["x-request-id"]
    drain_usage()
    assert not UsageRecord.objects.filter(request_id=request_id).exists()
    assert not UsageRecord.objects.filter(tenant=tenant[0]).exists()


def test_tool_calls_from_the_local_model(client):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    completion = client.chat.completions.create(model="local", tools=[tool], tool_choice="required",
                                                messages=[{"role": "user", "content": "what time is it"}])
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.tool_calls[0].function.name == "get_time"


def test_max_tokens_truncates_with_finish_reason_length(client):
    completion = client.chat.completions.create(model="local", max_tokens=3, messages=[{"role": "user", "content": "Hi there"}])
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3


def test_a_reused_client_request_id_never_merges_two_usage_rows(server, tenant, committed_db):
    import openai

    from billing.models import UsageRecord

    client = openai.OpenAI(base_url=server.base_url, api_key=tenant[2], max_retries=0)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="local", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Request-ID": "my-fixed-id"})
        assert raw.headers["x-request-id"] == "my-fixed-id"
    drain_usage()
    assert UsageRecord.objects.filter(tenant=tenant[0]).count() == 2
