"""No body sent to the Anthropic Messages or OpenAI Responses door gets a 5xx (issues 20 and 21).

The same mutations as tests/gateway/test_fuzz.py (wrong types at any path, null, huge and deep
values, fields removed or added), applied to valid `/v1/messages` and `/v1/responses` bodies and
sent to the running server, JSON and streamed. Every refusal must be a 4xx in the door's own
error shape: Anthropic's `{"type": "error", "error": {...}}` for /v1/messages (validated against
the spec's schema), OpenAI's for /v1/responses (a 400 naming its `param`).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.conftest import schema
from tests.gateway.test_fuzz import (
    BIG,
    HTTP_CASES,
    OPS,
    TEXT,
    Client,
    assert_refusal,
    encode,
    fuzz_settings,
    mutate,
    paths,
)

ANTHROPIC_ERRORS = jsonschema.Draft202012Validator(schema("anthropic.ErrorResponse"))
MODELS = st.sampled_from(["local", "gpt-4o-mini"])
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@st.composite
def messages_bodies(draw, stream: bool) -> dict:
    content = draw(st.one_of(TEXT, st.just([{"type": "text", "text": draw(TEXT)}])))
    body: dict[str, Any] = {"model": draw(MODELS), "max_tokens": draw(st.integers(1, 200)),
                            "messages": [{"role": "user", "content": content}], "stream": stream}
    if draw(st.booleans()):
        body["system"] = draw(st.one_of(TEXT, st.just([{"type": "text", "text": "be brief"}])))
    if draw(st.booleans()):
        body["tools"] = [{"name": "lookup", "description": "look up", "input_schema": PARAMS}]
        body["tool_choice"] = draw(st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "lookup"}]))
    for name, values in (("temperature", st.floats(0, 1)), ("top_p", st.floats(0, 1)), ("top_k", st.integers(1, 50)),
                         ("stop_sequences", st.lists(TEXT, max_size=2)), ("metadata", st.just({"user_id": "u-1"}))):
        if draw(st.booleans()):
            body[name] = draw(values)
    if draw(st.booleans()):  # a second turn with a tool round trip
        body["messages"] += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"city": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]
    return body


@st.composite
def responses_bodies(draw, stream: bool) -> dict:
    body: dict[str, Any] = {"model": draw(MODELS), "stream": stream,
                            "input": draw(st.one_of(TEXT, st.just([{"role": "user", "content": draw(TEXT)}]),
                                                    st.just([{"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "hi"}]}])))}
    if draw(st.booleans()):
        body["instructions"] = draw(TEXT)
    if draw(st.booleans()):
        body["tools"] = [{"type": "function", "name": "lookup", "parameters": PARAMS}]
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", {"type": "function", "name": "lookup"}]))
    for name, values in (("max_output_tokens", st.integers(16, 200)), ("temperature", st.floats(0, 2)),
                         ("metadata", st.just({"k": "v"})), ("store", st.booleans()),
                         ("text", st.just({"format": {"type": "text"}}))):
        if draw(st.booleans()):
            body[name] = draw(values)
    return body


@st.composite
def mutated(draw, valid) -> Any:
    body = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        body = mutate(draw, body, draw(st.sampled_from(paths(body))), draw(st.sampled_from(OPS)))
    return body


def check_messages(status: int, headers: dict, raw: bytes, body: Any) -> None:
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert raw.rstrip().endswith(b'data: {"type":"message_stop"}'), raw[-300:]
        else:
            assert orjson.loads(raw)["type"] == "message"
        return
    payload = orjson.loads(raw)
    assert status < 500, (status, payload, encode(body)[:2000])
    ANTHROPIC_ERRORS.validate(payload)


def check_responses(status: int, headers: dict, raw: bytes, body: Any) -> None:
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert b"event: response.completed" in raw or b"event: response.incomplete" in raw, raw[-300:]
        else:
            assert orjson.loads(raw)["object"] == "response"
        return
    payload = orjson.loads(raw)
    assert status < 500, (status, payload, encode(body)[:2000])
    assert_refusal(payload, status, body)


DOORS = {"messages": ("/v1/messages", messages_bodies, check_messages),
         "responses": ("/v1/responses", responses_bodies, check_responses)}


@pytest.fixture()
def door_client(server, tenants, fakes_reset):
    _, _, secret = tenants.make(tier=BIG)
    client = Client(server, secret)
    yield client
    client.conn.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("door", sorted(DOORS))
def test_no_mutated_body_gets_a_5xx_from_a_front_door(door_client, door, stream):
    path, valid, check = DOORS[door]

    @fuzz_settings(HTTP_CASES // 8, HealthCheck.function_scoped_fixture)
    @given(body=st.one_of(mutated(valid(stream)), valid(stream)), ascii_only=st.booleans())
    def run(body, ascii_only):
        answer = door_client.post(encode(body, ascii_only), {}, path=path)
        statuses[answer.status] += 1
        check(answer.status, answer.headers, answer.body, body)

    statuses: Counter[int] = Counter()
    run()
    assert statuses[200] and statuses[400], statuses  # both ends reached
