"""Structured outputs: hold the model's answer to the JSON Schema the client asked for.

With `response_format` `json_schema` (strict) or `json_object`, a completion is only returned when
its content parses as JSON and matches the schema. Invalid output gets one repair attempt that
shows the model its own answer and the validation error; after that the request fails closed with
a 502 naming the problem. Output cut off by `max_tokens` (`finish_reason: length`) is never
passed off as valid, even when the partial text happens to parse.

    completion, repairs = await complete_structured(call_once, req)   # non-streaming
    checker = StreamChecker(schema); checker.feed(chunk.as_dict) ...; checker.problem()  # streams
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing.exceptions import Unresolvable

from .errors import GatewayError
from .types import ChatRequest, Completion

SCHEMA_PARAM = "response_format.json_schema.schema"
JSON_OBJECT_SCHEMA: dict = {"type": "object"}
_MAX_DETAIL = 300  # validation messages quote the instance; keep errors readable

CallOnce = Callable[[ChatRequest], Awaitable[Completion]]


def schema_of(req: ChatRequest) -> dict | None:
    """The schema to enforce, or None: only strict `json_schema` and `json_object` are enforced."""
    fmt = req.params.get("response_format")
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or spec.get("strict") is not True:
        return None  # non-strict is best effort upstream, as with OpenAI
    schema = spec.get("schema")
    return schema if isinstance(schema, dict) else None


def _invalid_schema(message: str) -> GatewayError:
    return GatewayError(400, f"Invalid 'response_format.json_schema.schema': {_clip(message)}",
                        param=SCHEMA_PARAM, code="invalid_json_schema")


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _build(schema: dict) -> Validator:
    if not isinstance(schema.get("$schema", ""), str):  # validator_for looks it up as a key
        raise _invalid_schema("'$schema' must be a string (a dialect's URI).")
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        path = exc.json_path if exc.path else ""
        raise _invalid_schema(f"{exc.message}{f' at {path}' if path else ''}") from None
    except RecursionError:  # the boundary bounds nesting; this is the last guard
        raise _invalid_schema("it is nested too deeply to check.") from None
    return cls(schema)


@lru_cache(maxsize=256)
def _build_cached(key: bytes) -> Validator:
    return _build(orjson.loads(key))


def _validator(schema: dict) -> Validator:
    """Compiled once per distinct schema: the same schema arrives on request after request."""
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson's nesting limit (254 levels); the boundary allows far fewer
        raise _invalid_schema("it is nested too deeply.") from None
    return _build_cached(key)


def validate_schema(schema: Any) -> None:
    """At the boundary: a bad schema is the client's error (400), found before any provider call."""
    if not isinstance(schema, dict):
        raise _invalid_schema("must be a JSON object.")
    _validator(schema)


def check(content: str | None, finish_reason: str | None, schema: dict) -> str | None:
    """None when `content` is complete JSON matching `schema`; else a short problem for humans."""
    if finish_reason == "length":
        return "the output was cut off (finish_reason=length) before the JSON was complete"
    if finish_reason == "content_filter":
        return "the output was stopped by the content filter (finish_reason=content_filter) before the JSON was complete"
    if not isinstance(content, str) or not content.strip():
        return "the output is not valid JSON: the output is empty"
    try:
        instance = json.loads(content, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return f"the output is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:
        return f"the output is not valid JSON: {exc}"
    except RecursionError:
        return "the output is not valid JSON: it is nested too deeply"
    try:
        error = best_match(_validator(schema).iter_errors(instance))
    except Unresolvable as exc:
        raise _invalid_schema(f"a $ref cannot be resolved ({exc}).") from None
    except RecursionError:
        return "the output does not match the schema: it is nested too deeply to check"
    if error is None:
        return None
    return f"the output does not match the schema: {_clip(error.message)} at {error.json_path}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _choice_problem(choice: dict, schema: dict) -> tuple[str, str] | None:
    """(bad output, problem) for one completion choice; tool calls and refusals pass unchecked."""
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    content = message.get("content")
    if finish == "tool_calls" or (content is None and (message.get("tool_calls") or message.get("refusal"))):
        return None
    problem = check(content, finish, schema)
    return None if problem is None else (content or "", problem)


def _completion_problem(completion: Completion, schema: dict) -> tuple[str, str] | None:
    """The first bad choice: with `n` > 1 every choice must hold (or the client gets bad data)."""
    choices = completion.as_dict.get("choices") or []
    if not choices:
        return "", "the output is not valid JSON: the provider returned no choices"
    for choice in choices:
        found = _choice_problem(choice, schema)
        if found is not None:
            return found
    return None


REPAIR_PROMPT = (
    "Your previous answer was rejected: {problem}. Answer again with only {target}: no prose, "
    "no Markdown code fences{shorter}."
)
_MAX_INLINE_SCHEMA = 8000  # characters; lanes that drop response_format (Anthropic) never saw it


def _target(req: ChatRequest) -> str:
    schema = schema_of(req)
    if schema is None or schema is JSON_OBJECT_SCHEMA:
        return "a JSON object"
    text = orjson.dumps(schema).decode()
    if len(text) > _MAX_INLINE_SCHEMA:
        return "a JSON value that matches the requested JSON schema"
    return f"a JSON value that matches this JSON schema: {text}"


def repair_request(req: ChatRequest, bad_output: str, problem: str) -> ChatRequest:
    """The request again, plus the bad answer and why it failed (the original is left untouched)."""
    messages = list(req.messages)
    if bad_output:  # an empty assistant turn is refused by some providers (Anthropic)
        messages.append({"role": "assistant", "content": bad_output})
    shorter = ", and keep it short enough to finish" if "finish_reason=length" in problem else ""
    prompt = REPAIR_PROMPT.format(problem=problem, target=_target(req), shorter=shorter)
    messages.append({"role": "user", "content": prompt})
    return dataclasses.replace(req, messages=messages)


async def complete_structured(call_once: CallOnce, req: ChatRequest) -> tuple[Completion, int]:
    """One call, at most one repair; returns (completion, repairs made) or raises a 502."""
    completion = await call_once(req)
    schema = schema_of(req)
    if schema is None:
        return completion, 0
    found = _completion_problem(completion, schema)
    if found is None:
        return completion, 0
    bad_output, problem = found
    repaired = await call_once(repair_request(req, bad_output, problem))
    found = _completion_problem(repaired, schema)
    if found is None:
        return repaired, 1
    raise GatewayError(
        502,
        "The model's output did not match the requested JSON schema after one repair attempt: "
        f"{found[1]}",
        type="server_error",
        code="structured_output_invalid",
    )


class StreamChecker:
    """Reassembles a stream's content per choice so its end can be checked (no repair: sent already)."""

    __slots__ = ("schema", "_parts", "_finish", "_unchecked")

    def __init__(self, schema: dict) -> None:
        self.schema = schema
        self._parts: dict[int, list[str]] = {}
        self._finish: dict[int, str | None] = {}
        self._unchecked: set[int] = set()  # choices answering with tool calls or a refusal

    def feed(self, chunk: dict) -> None:
        """Take one `chat.completion.chunk` (as a dict); usage-only chunks are ignored."""
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            parts = self._parts.setdefault(index, [])
            content = delta.get("content")
            if content:
                parts.append(content)
            if delta.get("tool_calls") or delta.get("refusal"):
                self._unchecked.add(index)
            finish = choice.get("finish_reason")
            if finish is not None:
                self._finish[index] = finish
            else:
                self._finish.setdefault(index, None)

    @property
    def content(self) -> str:
        """Choice 0's text so far."""
        return "".join(self._parts.get(0, ()))

    def problem(self) -> str | None:
        """None when every choice is complete JSON matching the schema; else the first problem."""
        for index in sorted(self._parts) or [0]:
            finish = self._finish.get(index)
            if index in self._unchecked or finish == "tool_calls":
                continue
            if finish is None:
                return "the output was cut off (no finish_reason) before the JSON was complete"
            problem = check("".join(self._parts.get(index, ())), finish, self.schema)
            if problem is not None:
                return problem
        return None
