"""The Anthropic front door's pure translators: requests in (anthropic_wire.py); Messages,
events and errors out (anthropic_render.py).

No network: bodies are parsed into the normalized request, normalized answers rendered back, and
every rendered body validated against Anthropic's strict JSON Schemas (tests/schemas/).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest

from gateway.errors import GatewayError
from gateway.frontdoors import anthropic_render as render
from gateway.frontdoors import anthropic_wire as wire
from gateway.providers.base import UpstreamError
from gateway.types import ChatRequest, Chunk, Completion, Usage

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"anthropic.{name}.schema.json").read_text()))


MESSAGE, STREAM_EVENT, ERROR = _validator("Message"), _validator("MessageStreamEvent"), _validator("ErrorResponse")
LOOKUP = {"name": "lookup", "description": "Look up.", "input_schema": {"type": "object", "properties": {}}}


def parse(**body) -> ChatRequest:
    return wire.parse_request({"model": "m", "max_tokens": 10, **body})


def refused(**body) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        wire.parse_request(body)
    assert caught.value.status == 400
    return caught.value


# -- requests --------------------------------------------------------------------------------


def test_text_system_and_turns_become_normalized_messages_and_the_body_is_kept_native():
    body = {"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": [{"type": "text", "text": "again"}]}]}
    req = wire.parse_request(body)
    assert req.messages == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    assert (req.model, req.max_tokens, req.stream, req.native) == ("m", 10, False, ("anthropic", body))


def test_sampling_stops_and_the_end_user_become_parameters():
    req = parse(messages=[{"role": "user", "content": "x"}], temperature=0.2, top_p=0.5, top_k=3,
                stop_sequences=["A", "B"], metadata={"user_id": "u1"})
    assert req.params == {"temperature": 0.2, "top_p": 0.5, "stop": ["A", "B"], "user": "u1"}  # top_k: native only
    assert req.user == "u1"


def test_a_stream_asks_for_usage_so_the_final_event_can_carry_it():
    req = parse(messages=[{"role": "user", "content": "x"}], stream=True)
    assert req.stream and req.include_usage


def test_images_and_documents_become_openai_content_parts():
    req = parse(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "PDF"}, "title": "t"},
        {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}}]}])
    assert req.messages[0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,PDF", "filename": "t"}},
        {"type": "text", "text": "look"}]


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages():
    req = parse(tools=[LOOKUP], messages=[
        {"role": "user", "content": "find"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "on it"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "42"}]},
                                     {"type": "text", "text": "thanks"}]}])
    assert req.messages[1] == {"role": "assistant", "content": "on it", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":1}'}}]}
    assert req.messages[2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "42"},
                                {"role": "user", "content": "thanks"}]
    assert req.params["tools"] == [{"type": "function", "function": {"name": "lookup", "description": "Look up.",
                                                                     "parameters": {"type": "object", "properties": {}}}}]


def test_a_tool_error_result_says_so_to_a_lane_without_is_error():
    req = parse(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "boom",
                                                        "is_error": True}]}])
    assert req.messages == [{"role": "tool", "tool_call_id": "t", "content": "Error: boom"}]


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "lookup"}, {"tool_choice": {"type": "function", "function": {"name": "lookup"}}}),
    ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False}),
])
def test_tool_choice_maps_to_openais(choice, expected):
    params = parse(tools=[LOOKUP], tool_choice=choice, messages=[{"role": "user", "content": "x"}]).params
    assert {k: params[k] for k in params if k != "tools"} == expected


@pytest.mark.parametrize("body, message", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
    ({"model": "m", "max_tokens": 5}, "messages: Field required"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens: Input should be an integer greater than or equal to 1"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     "messages.0.role: Input should be 'user' or 'assistant'"),
    ({"model": "m", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
     "temperature: Input should be a number between 0 and 1"),
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]},
     "tool_choice: 'any' needs 'tools'"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "messages.0.content.0.type: blocks of type 'tool_use' are not accepted in a user message"),
    ({"model": "m", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 100},
      "messages": [{"role": "user", "content": "x"}]}, "thinking.budget_tokens: Input should be an integer of at least 1024"),
])
def test_bad_input_is_a_400_naming_the_field(body, message):
    assert refused(**body).message == message


def test_server_tools_are_refused_rather_than_dropped_on_the_way_to_other_lanes():
    error = refused(model="m", max_tokens=5, tools=[{"type": "web_search_20250305", "name": "web_search"}],
                    messages=[{"role": "user", "content": "x"}])
    assert error.param == "tools.0.type"


def test_count_tokens_bodies_need_no_max_tokens():
    req = wire.parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}, need_max_tokens=False)
    assert req.max_tokens is None


# -- whole answers ---------------------------------------------------------------------------


def completion(message: dict, finish: str = "stop") -> Completion:
    return Completion(obj={"id": "c", "object": "chat.completion", "created": 1, "model": "up",
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                           "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})


def test_a_text_answer_is_a_valid_message_with_every_always_sent_field():
    usage = Usage(prompt_tokens=20, completion_tokens=5, cached_tokens=7, cache_creation_tokens=3)
    message = render.to_message(completion({"role": "assistant", "content": "hi"}), "msg_1", "up", usage)
    MESSAGE.validate(message)
    assert message["content"] == [{"type": "text", "text": "hi", "citations": None}]
    assert (message["stop_reason"], message["stop_sequence"], message["container"]) == ("end_turn", None, None)
    assert message["usage"] == {"input_tokens": 10, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3,
                                "output_tokens": 5, "server_tool_use": None, "cache_creation": None,
                                "service_tier": None, "inference_geo": None}


def test_tool_calls_and_thinking_become_blocks_in_anthropics_order():
    answer = completion({"role": "assistant", "content": None, "reasoning_content": "think", "reasoning_signature": "sig",
                         "tool_calls": [{"id": "call.1", "type": "function",
                                         "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]}, "tool_calls")
    message = render.to_message(answer, "msg_1", "up", None)
    MESSAGE.validate(message)
    assert [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
    assert message["content"][0] == {"type": "thinking", "thinking": "think", "signature": "sig"}
    assert message["content"][1]["id"] == "call_1" and message["content"][1]["input"] == {"q": "x"}
    assert message["stop_reason"] == "tool_use"


@pytest.mark.parametrize("finish, stop", [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
                                          ("content_filter", "refusal"), (None, "end_turn")])
def test_finish_reasons_become_stop_reasons(finish, stop):
    assert render.stop_reason(finish) == stop


# -- streams ---------------------------------------------------------------------------------


def chunk(delta: dict, finish: str | None = None) -> Chunk:
    return Chunk(obj={"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def events(raw: bytes) -> list[dict]:
    """Parse SSE bytes, checking each `event:` line names its data's type; validate each."""
    out = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        name, data = frame.split("\n")
        data = json.loads(data.removeprefix("data: "))
        assert name == f"event: {data['type']}"
        (ERROR if data["type"] == "error" else STREAM_EVENT).validate(data)
        out.append(data)
    return out


def test_text_then_a_tool_call_stream_in_anthropics_exact_sequence():
    renderer = render.StreamRenderer("msg_1", "up")
    raw = renderer.start()
    for piece in (chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
                  chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "lookup", "arguments": ""}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
                  chunk({}, "tool_calls")):
        raw += renderer.feed(piece)
    raw += renderer.finish(Usage(prompt_tokens=9, completion_tokens=4))
    got = events(raw)
    assert [e["type"] for e in got] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert [e.get("index") for e in got[1:10]] == [0, None, 0, 0, 0, 1, 1, 1, 1]
    assert got[6]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {},
                                       "caller": {"type": "direct"}}
    assert got[10]["delta"]["stop_reason"] == "tool_use"
    assert got[10]["usage"] == {"input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                                "output_tokens": 4, "server_tool_use": None}


def test_thinking_deltas_and_their_signature_open_a_thinking_block_first():
    renderer = render.StreamRenderer("msg_1", "up")
    raw = renderer.start() + renderer.feed(chunk({"reasoning_content": "hmm"})) + renderer.feed(
        chunk({"reasoning_signature": "sig"})) + renderer.feed(chunk({"content": "ok"})) + renderer.finish(None)
    got = events(raw)
    deltas = [e["delta"] for e in got if e["type"] == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "hmm"}, {"type": "signature_delta", "signature": "sig"},
                      {"type": "text_delta", "text": "ok"}]
    assert [e["content_block"]["type"] for e in got if e["type"] == "content_block_start"] == ["thinking", "text"]


def test_an_empty_answer_still_pings_and_ends():
    renderer = render.StreamRenderer("msg_1", "up")
    got = events(renderer.start() + renderer.feed(chunk({}, "stop")) + renderer.finish(None))
    assert [e["type"] for e in got] == ["message_start", "ping", "message_delta", "message_stop"]


def test_usage_from_the_usage_only_chunk_is_used_when_the_end_carries_none():
    renderer = render.StreamRenderer("msg_1", "up")
    usage_chunk = Chunk(obj={"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up", "choices": [],
                             "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
    renderer.feed(usage_chunk)
    final = events(renderer.finish(None))[-2]
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (12, 3)


def test_a_failure_after_the_start_is_an_error_event():
    got = events(render.StreamRenderer.fail(GatewayError(502, "cut off", code="upstream_stream_cut"), "req_1"))
    assert got == [{"type": "error", "error": {"type": "api_error", "message": "cut off"}, "request_id": "req_1"}]


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, status, kind", [
    (GatewayError(400, "x"), 400, "invalid_request_error"),
    (GatewayError(401, "x"), 401, "authentication_error"),
    (GatewayError(403, "x"), 403, "permission_error"),
    (GatewayError(404, "x"), 404, "not_found_error"),
    (GatewayError(413, "x"), 413, "invalid_request_error"),
    (GatewayError(429, "x"), 429, "rate_limit_error"),
    (GatewayError(500, "x"), 500, "api_error"),
    (GatewayError(504, "x"), 504, "timeout_error"),
    (GatewayError(503, "x", code="all_lanes_unavailable"), 529, "overloaded_error"),
    (UpstreamError(502, "x", upstream_status=529), 529, "overloaded_error"),
    (UpstreamError(502, "x", upstream_status=500), 502, "api_error"),
])
def test_every_platform_error_has_an_anthropic_status_and_type(exc, status, kind):
    assert render.error_status(exc) == (status, kind)
    body = orjson.loads(render.error_body(exc, "req_1"))
    ERROR.validate(body)
    assert body["error"]["type"] == kind
