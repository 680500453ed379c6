"""OpenAI Chat Completions wire format: request checks, deterministic answers, JSON and SSE bytes.

Replies are ``"Echo: <last user text>"`` (directives removed; a trailing tool message reads as
``"Echo: tool said <content>"``), split into ``chunks`` slices. Usage: prompt_tokens = words of
every message + 3 per message, plus the cached / cache-write tokens asked for with
``[[cache:R]]`` / ``[[cache:R,W]]``; completion_tokens = number of slices sent, over all choices.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.support.directives import (
    Directives,
    Faults,
    split_even,
    strip_directives,
    truncate_at_stop,
    word_count,
)
from tests.support.harness import new_id

FINGERPRINT = "fp_fake0001"
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Anthropic stop reasons map onto OpenAI finish reasons, so one prompt drives both fakes.
FINISH_ALIASES = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}
STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request (fake fault).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict.", "invalid_request_error", None),
    422: ("Unprocessable request.", "invalid_request_error", None),
    429: (
        "Rate limit reached for requests. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
    529: ("The server is overloaded.", "server_error", "overloaded"),
}


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def content_text(content: Any) -> str:
    """Text of a message's ``content``: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("text"))
    return ""


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The fake's deterministic prompt size: words of all message texts + 3 per message."""
    return sum(word_count(content_text(m.get("content"))) + 3 for m in messages)


def source_message(messages: Any) -> tuple[str, bool]:
    """Text the reply echoes and whether it came from a tool result."""
    if not isinstance(messages, list):
        return "", False
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") in ("user", "tool"):
            return content_text(message.get("content")), message["role"] == "tool"
    return "", False


def validate(body: Any) -> tuple[str, str | None, str | None] | None:
    """The first problem OpenAI would report, as (message, param, code)."""
    if not isinstance(body, dict):
        return ("We could not parse the JSON body of your request.", None, None)
    if not body.get("model"):
        return ("you must provide a model parameter", None, None)
    messages = body.get("messages")
    if messages is None:
        return ("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        return (
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            return (
                f"Invalid value: {role!r}. Supported values are: {', '.join(ROLES)}.",
                f"messages[{i}].role",
                "invalid_value",
            )
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            return (
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                name,
                "integer_below_min_value",
            )
    if body.get("stream_options") is not None and not body.get("stream"):
        return (
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            None,
        )
    return None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    fragments: list[str]


@dataclass(slots=True)
class Plan:
    """One choice's answer, before it is rendered as JSON or SSE."""

    pieces: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish: str = "stop"

    @property
    def tokens(self) -> int:
        return len(self.pieces) + sum(len(t.fragments) for t in self.tool_calls)


def chosen_tools(body: dict[str, Any], directives: Directives, from_tool: bool) -> list[str]:
    """Tool names to call: a named ``tool_choice``, ``required``, or ``[[tool:NAME]]``."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return [name] if name else []
    if directives.tools:
        return list(directives.tools)
    if choice == "required" and not from_tool:
        first = tools[0].get("function", {}).get("name") if isinstance(tools[0], dict) else None
        return [first] if first else []
    return []


def plan_choice(
    body: dict[str, Any],
    text: str,
    from_tool: bool,
    directives: Directives,
    faults: Faults,
    chunks: int,
) -> Plan:
    """Decide content or tool calls, truncation and the finish reason for one choice."""
    chunks = directives.chunks or chunks
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    plan = Plan()
    if faults.empty:
        return plan
    clean = strip_directives(text)
    if names := chosen_tools(body, directives, from_tool):
        arguments = json.dumps({"q": clean})
        plan.tool_calls = [
            ToolCall(new_id("call_"), name, split_even(arguments, chunks)) for name in names
        ]
        plan.finish = "tool_calls"
        if limit is not None and plan.tokens > limit:
            budget = limit
            for call in plan.tool_calls:
                kept = call.fragments[:budget]
                budget = max(0, budget - len(call.fragments))
                call.fragments = kept
            plan.finish = "length"
    else:
        stops = body.get("stop")
        content = f"Echo: tool said {clean}" if from_tool else f"Echo: {clean}"
        content, _ = truncate_at_stop(content, [stops] if isinstance(stops, str) else stops or [])
        plan.pieces = split_even(content, chunks)
        if limit is not None and len(plan.pieces) > limit:
            plan.pieces = plan.pieces[:limit]
            plan.finish = "length"
    if directives.stop:
        plan.finish = FINISH_ALIASES.get(directives.stop, directives.stop)
    return plan


def usage(
    messages: list[dict[str, Any]], directives: Directives, completion: int
) -> dict[str, Any]:
    cached, written = directives.cache_read, directives.cache_write
    prompt = count_prompt_tokens(messages) + cached + written
    details: dict[str, int] = {"cached_tokens": cached, "audio_tokens": 0}
    if written:
        details["cache_write_tokens"] = written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion(
    cid: str, created: int, model: str, plans: list[Plan], usage: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    choices = []
    for index, plan in enumerate(plans):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(plan.pieces),
            "refusal": None,
            "annotations": [],
        }
        if plan.tool_calls:
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": t.id,
                    "type": "function",
                    "function": {"name": t.name, "arguments": "".join(t.fragments)},
                }
                for t in plan.tool_calls
            ]
        choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": plan.finish}
        )
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


def stream_events(
    cid: str,
    created: int,
    model: str,
    plans: list[Plan],
    usage: dict[str, Any] | None,
    faults: Faults,
) -> list[bytes]:
    """Every SSE event of the stream, as OpenAI orders them, ending with ``[DONE]``.

    Chunks are spliced from bytes so a benchmark's thousands of streams cost little CPU.
    """
    head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
        cid.encode(),
        created,
        orjson.dumps(model),
    )
    head += b'"service_tier":"default","system_fingerprint":"%s","choices":' % FINGERPRINT.encode()
    tail = (b',"usage":null' if usage is not None else b"") + b"}\n\n"

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b'%s[{"index":%d,"delta":%s,"logprobs":null,"finish_reason":%s}]%s' % (
            head,
            index,
            orjson.dumps(delta),
            orjson.dumps(finish),
            tail,
        )

    per_choice: list[list[bytes]] = []
    for index, plan in enumerate(plans):
        events: list[bytes] = []
        if plan.tool_calls:
            for k, call in enumerate(plan.tool_calls):
                opening: dict[str, Any] = {
                    "tool_calls": [
                        {
                            "index": k,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
                if k == 0:
                    opening = {"role": "assistant", "content": None, **opening, "refusal": None}
                events.append(chunk(index, opening))
                events.extend(
                    chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": f}}]})
                    for f in call.fragments
                )
        else:
            events.append(chunk(index, {"role": "assistant", "content": "", "refusal": None}))
            events.extend(chunk(index, {"content": piece}) for piece in plan.pieces)
        events.append(chunk(index, {}, plan.finish))
        per_choice.append(events)
    # With n > 1, OpenAI interleaves the choices' chunks.
    out = [e for group in _interleave(per_choice) for e in group]
    if usage is not None:
        out.append(head + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
    if faults.malformed:
        bad = b'data: {"id": "%s", "choices": [{"delta": {"content": "oops\n\n' % cid.encode()
        out.insert(min(2, len(out)), bad)
    if faults.stream_error_after is not None:
        err = error_body("The server had an error while processing your request.", "server_error")
        return [*out[: faults.stream_error_after], b"data: " + orjson.dumps(err) + b"\n\n"]
    out.append(b"data: [DONE]\n\n")
    return out


def _interleave(groups: list[list[bytes]]) -> Iterable[list[bytes]]:
    if len(groups) == 1:
        yield groups[0]
        return
    for i in range(max(len(g) for g in groups)):
        yield [g[i] for g in groups if i < len(g)]
