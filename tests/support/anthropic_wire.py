"""Anthropic Messages wire format: request checks, deterministic answers, JSON and SSE bytes.

Replies are ``"Echo: <last user text>"`` (directives removed; a tool_result block reads as
``"tool said <content>"``), split into ``chunks`` slices. Usage: input_tokens = words of
``system`` and of every message + 3 per message; cache tokens only from ``[[cache:R,C]]``
(read R, created C); output_tokens = number of slices sent.
"""

from __future__ import annotations

import json
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

# OpenAI finish reasons map onto Anthropic stop reasons, so one prompt drives both fakes.
STOP_ALIASES = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "tool_calls": "tool_use",
}
DEFAULT_STOP_SEQUENCE = "\n\nHuman:"
DELTA_USAGE_KEYS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
    "server_tool_use",
)
MALFORMED_EVENT = (
    b"event: content_block_delta\n"
    b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "oops\n\n'
)
STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (fake fault)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "The requested resource could not be found."),
    408: ("timeout_error", "Request timeout"),
    409: ("invalid_request_error", "Conflict."),
    422: ("invalid_request_error", "Unprocessable request."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


def error_body(type_: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}


def block_text(content: Any) -> str:
    """Readable text of a ``content`` value: text blocks, and tool results as 'tool said ...'."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            parts.append("tool said " + block_text(block.get("content")))
    return " ".join(parts)


def count_input_tokens(body: dict[str, Any]) -> int:
    """The fake's deterministic input size: words of system and all messages + 3 per message."""
    messages = body.get("messages") or []
    return word_count(block_text(body.get("system"))) + sum(
        word_count(block_text(m.get("content"))) + 3 for m in messages
    )


def source_text(messages: Any) -> tuple[str, bool]:
    """Text of the last user message and whether it carries a tool result."""
    if not isinstance(messages, list):
        return "", False
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            has_result = isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content
            )
            return block_text(content), has_result
    return "", False


def validate(body: Any, *, need_max_tokens: bool = True) -> str | None:
    """The first problem Anthropic would report, as its error message."""
    if not isinstance(body, dict):
        return "Request body is not valid JSON."
    if not body.get("model"):
        return "model: Field required"
    if need_max_tokens:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return "max_tokens: Field required"
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return "max_tokens: Input should be greater than or equal to 1"
    messages = body.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    return None


@dataclass(slots=True)
class Block:
    """One content block of the answer: text slices, or a tool call's JSON fragments."""

    pieces: list[str]
    tool_id: str | None = None
    tool_name: str | None = None
    tool_input: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Plan:
    blocks: list[Block] = field(default_factory=list)
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None

    @property
    def tokens(self) -> int:
        return sum(len(b.pieces) for b in self.blocks)


def chosen_tools(body: dict[str, Any], directives: Directives, from_tool: bool) -> list[str]:
    """Tool names to call: ``tool_choice`` ``{type: tool}``/``any``, or ``[[tool:NAME]]``."""
    tools = body.get("tools")
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not tools or kind == "none":
        return []
    if kind == "tool" and choice.get("name"):
        return [choice["name"]]
    if directives.tools:
        return list(directives.tools)
    if kind == "any" and not from_tool and isinstance(tools[0], dict) and tools[0].get("name"):
        return [tools[0]["name"]]
    return []


def model_info(model_id: str, display_name: str, created_at: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": created_at,
        "capabilities": None,
        "max_input_tokens": 200000,
        "max_tokens": 64000,
    }


def event(data: dict[str, Any]) -> bytes:
    """One named SSE event; Anthropic names each event after its ``type``."""
    return b"event: %s\ndata: %s\n\n" % (data["type"].encode(), orjson.dumps(data))


def plan_message(
    body: dict[str, Any],
    text: str,
    from_tool: bool,
    directives: Directives,
    faults: Faults,
    chunks: int,
) -> Plan:
    """Decide content blocks, truncation and the stop reason."""
    chunks = directives.chunks or chunks
    limit: int = body["max_tokens"]
    stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str)]
    plan = Plan()
    if faults.empty:
        return plan
    clean = strip_directives(text)
    if names := chosen_tools(body, directives, from_tool):
        tool_input = {"q": clean}
        fragments = split_even(json.dumps(tool_input), chunks)
        plan.blocks = [Block(list(fragments), new_id("toolu_"), name, tool_input) for name in names]
        plan.stop_reason = "tool_use"
    else:
        content, hit = truncate_at_stop(f"Echo: {clean}", stops)
        plan.blocks = [Block(split_even(content, chunks))]
        if hit is not None:
            plan.stop_reason, plan.stop_sequence = "stop_sequence", hit
    if plan.tokens > limit:
        budget = limit
        for block in plan.blocks:
            kept = block.pieces[:budget]
            if len(kept) < len(block.pieces) and block.tool_id is not None:
                block.tool_input = {}  # its JSON was cut short
            budget = max(0, budget - len(block.pieces))
            block.pieces = kept
        plan.stop_reason, plan.stop_sequence = "max_tokens", None
    if directives.stop:
        plan.stop_reason = STOP_ALIASES.get(directives.stop, directives.stop)
        if plan.stop_reason != "stop_sequence":
            plan.stop_sequence = None
        elif plan.stop_sequence is None:
            plan.stop_sequence = stops[0] if stops else DEFAULT_STOP_SEQUENCE
    return plan


def usage(body: dict[str, Any], directives: Directives, output: int) -> dict[str, Any]:
    read, created = directives.cache_read, directives.cache_write
    return {
        "input_tokens": count_input_tokens(body),
        "output_tokens": output,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": created, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": None,
        "service_tier": "standard",
        "inference_geo": None,
    }


def content_block(block: Block, *, complete: bool) -> dict[str, Any]:
    """A block as the final message has it, or empty as ``content_block_start`` opens it."""
    if block.tool_id is None:
        text = "".join(block.pieces) if complete else ""
        return {"type": "text", "text": text, "citations": None}
    return {
        "type": "tool_use",
        "id": block.tool_id,
        "name": block.tool_name,
        "input": block.tool_input if complete else {},
        "caller": {"type": "direct"},
    }


def message(
    mid: str, model: str, plan: Plan, usage: dict[str, Any], *, started: bool = False
) -> dict[str, Any]:
    """The final ``message``, or the empty one that ``message_start`` carries."""
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if started else [content_block(b, complete=True) for b in plan.blocks],
        "stop_reason": None if started else plan.stop_reason,
        "stop_sequence": None if started else plan.stop_sequence,
        "stop_details": None,
        "container": None,
        "usage": usage,
    }


def stream_events(
    mid: str, model: str, plan: Plan, usage: dict[str, Any], faults: Faults, request_id: str
) -> list[bytes]:
    """Every named SSE event of the stream, in Anthropic's order, ending with message_stop."""
    start_usage = {**usage, "output_tokens": min(1, usage["output_tokens"])}
    started = message(mid, model, plan, start_usage, started=True)
    out = [event({"type": "message_start", "message": started})]
    ping = event({"type": "ping"})
    for index, block in enumerate(plan.blocks):
        opening = content_block(block, complete=False)
        out.append(event({"type": "content_block_start", "index": index, "content_block": opening}))
        if index == 0:
            out.append(ping)
        if block.tool_id is None:
            deltas = [{"type": "text_delta", "text": p} for p in block.pieces]
        else:  # Anthropic opens a tool's input with an empty fragment.
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in ["", *block.pieces]]
        out.extend(
            event({"type": "content_block_delta", "index": index, "delta": d}) for d in deltas
        )
        out.append(event({"type": "content_block_stop", "index": index}))
    if not plan.blocks:
        out.append(ping)
    delta = {
        "stop_reason": plan.stop_reason,
        "stop_sequence": plan.stop_sequence,
        "stop_details": None,
        "container": None,
    }
    cumulative = {k: usage[k] for k in DELTA_USAGE_KEYS}
    out.append(event({"type": "message_delta", "delta": delta, "usage": cumulative}))
    if faults.malformed:
        out.insert(min(3, len(out)), MALFORMED_EVENT)
    if faults.stream_error_after is not None:
        err = event(error_body("overloaded_error", "Overloaded", request_id))
        return [*out[: faults.stream_error_after], err]
    out.append(event({"type": "message_stop"}))
    return out
