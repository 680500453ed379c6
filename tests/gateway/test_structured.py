"""Structured outputs are validated, repaired once, then fail closed; truncation never passes."""

from __future__ import annotations

import asyncio
import copy

import pytest

from gateway.errors import GatewayError
from gateway.structured import (
    StreamChecker,
    check,
    complete_structured,
    repair_request,
    schema_of,
    validate_schema,
)
from gateway.types import ChatRequest, Completion

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
GOOD = '{"name": "Ada", "age": 36}'
MISSING_AGE = '{"name": "Ada"}'


def strict(schema: dict = SCHEMA, **params) -> ChatRequest:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}}
    return ChatRequest(model="m", messages=[{"role": "user", "content": "Who?"}],
                       params={"response_format": fmt, **params})


def completion(*contents: str | None, finish: str = "stop", tool_calls: list | None = None) -> Completion:
    choices = []
    for i, content in enumerate(contents):
        message: dict = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
    return Completion(obj={"id": "c", "object": "chat.completion", "choices": choices})


class Scripted:
    """A fake provider call: returns the scripted completions in order, recording each request."""

    def __init__(self, *answers: Completion) -> None:
        self.answers = list(answers)
        self.requests: list[ChatRequest] = []

    async def __call__(self, req: ChatRequest) -> Completion:
        self.requests.append(req)
        return self.answers.pop(0)


def run(call: Scripted, req: ChatRequest) -> tuple[Completion, int]:
    return asyncio.run(complete_structured(call, req))


def content_of(c: Completion, i: int = 0) -> str:
    return c.as_dict["choices"][i]["message"]["content"]


# --- schema_of -------------------------------------------------------------------------------

def test_schema_of_only_enforces_strict_json_schema_and_json_object():
    assert schema_of(strict()) == SCHEMA
    assert schema_of(ChatRequest(model="m", messages=[], params={"response_format": {"type": "json_object"}})) == {"type": "object"}
    loose = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    assert schema_of(ChatRequest(model="m", messages=[], params={"response_format": loose})) is None
    assert schema_of(ChatRequest(model="m", messages=[], params={"response_format": {"type": "text"}})) is None
    assert schema_of(ChatRequest(model="m", messages=[])) is None


# --- check -----------------------------------------------------------------------------------

def test_valid_output_passes():
    assert check(GOOD, "stop", SCHEMA) is None
    assert check(f"\n  {GOOD}  \n", "stop", SCHEMA) is None


def test_invalid_json_names_the_position():
    problem = check('{"name": "Ada" "age": 36}', "stop", SCHEMA)
    assert problem == "the output is not valid JSON: Expecting ',' delimiter at line 1 column 16"
    assert check("```json\n" + GOOD + "\n```", "stop", SCHEMA).startswith("the output is not valid JSON: ")
    assert check("", "stop", SCHEMA) == "the output is not valid JSON: the output is empty"
    assert check(None, "stop", SCHEMA) == "the output is not valid JSON: the output is empty"
    assert "NaN is not a JSON value" in check('{"name": "x", "age": NaN}', "stop", SCHEMA)


def test_schema_mismatch_names_the_error_and_path():
    assert check(MISSING_AGE, "stop", SCHEMA) == (
        "the output does not match the schema: 'age' is a required property at $")
    assert check('{"name": "Ada", "age": "old"}', "stop", SCHEMA) == (
        "the output does not match the schema: 'old' is not of type 'integer' at $.age")
    nested = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}}}}
    assert check('{"xs": [1, 2, "three"]}', "stop", nested).endswith("at $.xs[2]")


def test_truncated_output_is_never_valid_even_when_it_parses():
    problem = "the output was cut off (finish_reason=length) before the JSON was complete"
    assert check(GOOD, "length", SCHEMA) == problem
    assert check('{"name": "A', "length", SCHEMA) == problem
    assert check("12", "length", {"type": "integer"}) == problem


def test_long_validation_messages_are_clipped():
    problem = check('"' + "x" * 5000 + '"', "stop", {"type": "integer"})
    assert problem is not None and len(problem) < 400


def test_invalid_schema_is_a_400_at_the_boundary():
    for bad in ({"type": "nope"}, {"properties": {"a": {"minLength": -1}}}, ["not", "an", "object"]):
        with pytest.raises(GatewayError) as info:
            validate_schema(bad)
        err = info.value
        assert (err.status, err.code, err.param) == (400, "invalid_json_schema", "response_format.json_schema.schema")
        assert err.type == "invalid_request_error"
    validate_schema(SCHEMA)  # a good one passes (and is compiled for later)


def test_unresolvable_ref_is_the_clients_error_not_a_fetch():
    with pytest.raises(GatewayError) as info:
        check("1", "stop", {"$ref": "https://example.invalid/schema.json"})
    assert (info.value.status, info.value.code) == (400, "invalid_json_schema")


# --- repair_request --------------------------------------------------------------------------

def test_repair_request_appends_without_mutating_the_original():
    req = strict(temperature=0.2)
    before = copy.deepcopy(req.messages)
    repaired = repair_request(req, MISSING_AGE, "the output does not match the schema: 'age' is a required property at $")
    assert req.messages == before
    assert repaired.messages[:-2] == before
    assert repaired.messages[-2] == {"role": "assistant", "content": MISSING_AGE}
    assert repaired.messages[-1]["role"] == "user"
    assert "'age' is a required property at $" in repaired.messages[-1]["content"]
    assert "only a JSON value that matches this JSON schema: {" in repaired.messages[-1]["content"]
    assert '"required":["name","age"]' in repaired.messages[-1]["content"]  # lanes may drop response_format
    assert repaired.params == req.params and repaired.model == req.model


def test_repair_request_skips_an_empty_assistant_turn():
    repaired = repair_request(strict(), "", "the output is not valid JSON: the output is empty")
    assert [m["role"] for m in repaired.messages] == ["user", "user"]


# --- complete_structured ---------------------------------------------------------------------

def test_valid_first_time_makes_one_call():
    call = Scripted(completion(GOOD))
    result, repairs = run(call, strict())
    assert (content_of(result), repairs, len(call.requests)) == (GOOD, 0, 1)


def test_without_a_schema_the_output_is_not_checked():
    call = Scripted(completion("not json"))
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    result, repairs = run(call, req)
    assert (content_of(result), repairs, len(call.requests)) == ("not json", 0, 1)


def test_invalid_output_is_repaired_once():
    req = strict()
    before = copy.deepcopy(req.messages)
    call = Scripted(completion(MISSING_AGE), completion(GOOD))
    result, repairs = run(call, req)
    assert (content_of(result), repairs, len(call.requests)) == (GOOD, 1, 2)
    assert call.requests[0] is req and req.messages == before
    repair = call.requests[1]
    assert repair.messages[-2] == {"role": "assistant", "content": MISSING_AGE}
    assert "'age' is a required property at $" in repair.messages[-1]["content"]


def test_still_invalid_after_repair_fails_closed_with_502():
    call = Scripted(completion("nope"), completion(MISSING_AGE))
    with pytest.raises(GatewayError) as info:
        run(call, strict())
    err = info.value
    assert (err.status, err.code, err.type) == (502, "structured_output_invalid", "server_error")
    assert err.message == (
        "The model's output did not match the requested JSON schema after one repair attempt: "
        "the output does not match the schema: 'age' is a required property at $")
    assert len(call.requests) == 2


def test_truncated_output_is_never_returned_even_if_it_parses():
    call = Scripted(completion(GOOD, finish="length"), completion(GOOD, finish="length"))
    with pytest.raises(GatewayError) as info:
        run(call, strict())
    assert info.value.code == "structured_output_invalid"
    assert "cut off (finish_reason=length)" in info.value.message
    assert "finish_reason=length" in call.requests[1].messages[-1]["content"]


def test_truncated_then_repaired_is_returned():
    call = Scripted(completion('{"name": "A', finish="length"), completion(GOOD))
    result, repairs = run(call, strict())
    assert (content_of(result), repairs) == (GOOD, 1)


def test_json_object_mode_requires_an_object():
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                      params={"response_format": {"type": "json_object"}})
    assert run(Scripted(completion('{"a": 1}')), req)[1] == 0
    call = Scripted(completion("[1, 2]"), completion('{"a": [1, 2]}'))
    result, repairs = run(call, req)
    assert (content_of(result), repairs) == ('{"a": [1, 2]}', 1)
    assert "[1, 2] is not of type 'object' at $" in call.requests[1].messages[-1]["content"]
    assert "only a JSON object:" in call.requests[1].messages[-1]["content"]


def test_every_choice_is_checked_when_n_is_above_one():
    req = strict(n=2)
    call = Scripted(completion(GOOD, MISSING_AGE), completion(GOOD, GOOD))
    result, repairs = run(call, req)
    assert repairs == 1 and len(call.requests) == 2
    assert call.requests[1].messages[-2]["content"] == MISSING_AGE
    call = Scripted(completion(GOOD, "x"), completion(GOOD, "y"))
    with pytest.raises(GatewayError):
        run(call, req)


def test_tool_call_answers_pass_unchecked():
    calls = [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    call = Scripted(completion(None, finish="tool_calls", tool_calls=calls))
    result, repairs = run(call, strict())
    assert (repairs, len(call.requests)) == (0, 1)
    assert result.as_dict["choices"][0]["message"]["tool_calls"] == calls


def test_raw_bytes_completions_are_read():
    raw = Completion(raw=b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "{\\"name\\": \\"Ada\\", \\"age\\": 36}"}, "finish_reason": "stop"}]}')
    assert run(Scripted(raw), strict()) == (raw, 0)


# --- StreamChecker ---------------------------------------------------------------------------

def chunks(pieces: list[str], finish: str | None = "stop", index: int = 0) -> list[dict]:
    out = [{"choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    out += [{"choices": [{"index": index, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    if finish is not None:
        out.append({"choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    out.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    return out


def fed(schema: dict, stream: list[dict]) -> StreamChecker:
    checker = StreamChecker(schema)
    for chunk in stream:
        checker.feed(chunk)
    return checker


def test_stream_checker_reassembles_deltas():
    pieces = ['{"na', 'me": "A', 'da", "a', 'ge": 36}']
    checker = fed(SCHEMA, chunks(pieces))
    assert checker.content == GOOD
    assert checker.problem() is None


def test_stream_checker_reports_the_same_problems_as_check():
    assert fed(SCHEMA, chunks(['{"name": ', '"Ada"}'])).problem() == check(MISSING_AGE, "stop", SCHEMA)
    assert fed(SCHEMA, chunks(["{oops"])).problem() == check("{oops", "stop", SCHEMA)
    assert fed(SCHEMA, chunks([GOOD], finish="length")).problem() == (
        "the output was cut off (finish_reason=length) before the JSON was complete")
    assert "cut off" in fed(SCHEMA, chunks([GOOD], finish=None)).problem()
    assert fed(SCHEMA, []).problem() is not None


def test_stream_checker_checks_every_choice_and_skips_tool_calls():
    both = chunks([GOOD]) + chunks(["{}"], index=1)
    assert "'name' is a required property" in fed(SCHEMA, both).problem()
    tool = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f", "arguments": ""}}]}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    assert fed(SCHEMA, tool).problem() is None


def test_content_filter_stops_fail_and_refusals_pass_unchecked():
    assert "finish_reason=content_filter" in check(GOOD, "content_filter", SCHEMA)
    refusal = Completion(obj={"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I can't help with that."}}]})
    assert run(Scripted(refusal), strict()) == (refusal, 0)
