"""The platform's normalized answers in Anthropic's Messages API wire format (pure).

- `to_message`: a whole answer as an Anthropic `Message` (every field the API always sends).
- `StreamRenderer`: normalized deltas as Anthropic's exact SSE event sequence.
- `error_status` / `error_body`: any `GatewayError` in Anthropic's error shape and type.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..errors import GatewayError
from ..types import Chunk, Completion, Usage

_TOOL_ID = re.compile(r"[^a-zA-Z0-9_-]")

# OpenAI's finish_reason -> Anthropic's stop_reason.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


# -- answers ---------------------------------------------------------------------------------


def stop_reason(finish_reason: str | None) -> str:
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def usage_fields(usage: Usage | None) -> dict:
    """Anthropic counts cached input apart from `input_tokens` (the platform's prompt count
    includes it)."""
    usage = usage or Usage()
    read, created = usage.cached_tokens, usage.cache_creation_tokens
    return {"input_tokens": max(0, usage.prompt_tokens - read - created), "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read, "output_tokens": usage.completion_tokens, "server_tool_use": None}


def message_usage(usage: Usage | None) -> dict:
    """A `Message`'s usage: every field the API sends, null where the platform cannot know it."""
    return {**usage_fields(usage), "cache_creation": None, "service_tier": None, "inference_geo": None}


def tool_id(value: str | None, fallback: str) -> str:
    """Tool ids from other vendors, made to fit Anthropic's pattern ^[a-zA-Z0-9_-]+$."""
    return _TOOL_ID.sub("_", value) if value else fallback


def tool_input(arguments: Any) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _signature(data: dict, where: str) -> str | None:
    """The thinking block's signature an Anthropic lane reports (see providers/anthropic.py)."""
    choices = data.get("choices") or ()
    return (choices[0].get(where) or {}).get("reasoning_signature") if choices else None


def message_id(call_id: str) -> str:
    return call_id if call_id.startswith("msg_") else f"msg_{call_id.removeprefix('req_')}"


def to_message(completion: Completion, msg_id: str, model: str, usage: Usage | None) -> dict:
    """A whole normalized answer as an Anthropic `Message` (the first choice: n is always 1)."""
    choices = completion.choices()
    content: list[dict] = []
    finish = None
    if choices:
        choice = choices[0]
        finish = choice.finish_reason
        if choice.reasoning:
            content.append({"type": "thinking", "thinking": choice.reasoning,
                            "signature": _signature(completion.as_dict, "message") or ""})
        text = choice.text or choice.refusal
        if text:
            content.append({"type": "text", "text": text, "citations": None})
        for k, call in enumerate(choice.tool_calls or ()):
            content.append({"type": "tool_use", "id": tool_id(call["id"], f"toolu_{msg_id}_{k}"),
                            "name": call["name"] or "tool", "input": tool_input(call["arguments"]),
                            "caller": {"type": "direct"}})
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(finish), "stop_sequence": None, "stop_details": None, "container": None,
            "usage": message_usage(usage)}


def event(data: dict) -> bytes:
    """One SSE event, named after its type as Anthropic does."""
    return b"event: %s\ndata: %s\n\n" % (data["type"].encode(), orjson.dumps(data))


class StreamRenderer:
    """Normalized stream deltas as Anthropic's event sequence:

        message_start, (content_block_start, [ping], content_block_delta..., content_block_stop)...,
        message_delta (stop_reason, usage), message_stop        | ... error

    Text, thinking and each tool call are one content block each, opened when their first delta
    arrives and closed when another kind starts or the answer ends."""

    def __init__(self, msg_id: str, model: str, prompt_tokens: int = 0) -> None:
        self.msg_id = msg_id
        self.model = model
        self.prompt_tokens = prompt_tokens  # message_start's input count, before the provider's
        self.blocks = 0  # content blocks opened so far
        self.open: str | None = None  # the open block's kind: "text", "thinking" or "tool"
        self.tools: dict[int, int] = {}  # the normalized tool call index -> its block index
        self.pinged = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def start(self) -> bytes:
        message = {"id": self.msg_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "stop_details": None, "container": None,
                   "usage": message_usage(Usage(prompt_tokens=self.prompt_tokens))}
        return event({"type": "message_start", "message": message})

    def _close(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(event({"type": "content_block_stop", "index": self.blocks - 1}))
            self.open = None

    def _open(self, out: list[bytes], kind: str, block: dict) -> None:
        self._close(out)
        out.append(event({"type": "content_block_start", "index": self.blocks, "content_block": block}))
        self.blocks += 1
        self.open = kind
        if not self.pinged:
            out.append(event({"type": "ping"}))
            self.pinged = True

    def _delta(self, out: list[bytes], index: int, delta: dict) -> None:
        out.append(event({"type": "content_block_delta", "index": index, "delta": delta}))

    def feed(self, chunk: Chunk) -> bytes:
        """The events for one normalized chunk (often one; none for a role-only chunk)."""
        out: list[bytes] = []
        data = chunk.as_dict
        if data.get("usage"):
            self.usage = chunk.usage
        for choice in chunk.choices():
            if choice.index != 0:
                continue
            if choice.reasoning:
                if self.open != "thinking":
                    self._open(out, "thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self._delta(out, self.blocks - 1, {"type": "thinking_delta", "thinking": choice.reasoning})
            signature = _signature(data, "delta")
            if signature and self.open == "thinking":
                self._delta(out, self.blocks - 1, {"type": "signature_delta", "signature": signature})
            if choice.text:
                if self.open != "text":
                    self._open(out, "text", {"type": "text", "text": "", "citations": None})
                self._delta(out, self.blocks - 1, {"type": "text_delta", "text": choice.text})
            for call in choice.tool_calls or ():
                k = call["index"]
                if k not in self.tools:
                    self.tools[k] = self.blocks
                    block = {"type": "tool_use", "id": tool_id(call["id"], f"toolu_{self.msg_id}_{k}"),
                             "name": call["name"] or "tool", "input": {}, "caller": {"type": "direct"}}
                    self._open(out, "tool", block)
                if call["arguments"]:
                    self._delta(out, self.tools[k], {"type": "input_json_delta", "partial_json": call["arguments"]})
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        return b"".join(out)

    def finish(self, usage: Usage | None) -> bytes:
        """The answer's end: the open block's stop, message_delta and message_stop."""
        out: list[bytes] = []
        self._close(out)
        if not self.pinged:
            out.append(event({"type": "ping"}))
        delta = {"stop_reason": stop_reason(self.finish_reason), "stop_sequence": None, "stop_details": None,
                 "container": None}
        out.append(event({"type": "message_delta", "delta": delta, "usage": usage_fields(usage or self.usage)}))
        out.append(event({"type": "message_stop"}))
        return b"".join(out)

    @staticmethod
    def fail(exc: GatewayError, request_id: str) -> bytes:
        """An `error` event: the status was sent with the first byte."""
        return b"event: error\ndata: %s\n\n" % error_body(exc, request_id)


# -- errors ----------------------------------------------------------------------------------


def error_status(exc: GatewayError) -> tuple[int, str]:
    """The HTTP status and Anthropic error type for a platform error."""
    if exc.code == "all_lanes_unavailable" or getattr(exc, "upstream_status", None) == 529:
        return 529, "overloaded_error"
    status = exc.status
    kinds = {401: "authentication_error", 402: "billing_error", 403: "permission_error", 404: "not_found_error",
             429: "rate_limit_error", 504: "timeout_error"}
    if status in kinds:
        return status, kinds[status]
    return status, "api_error" if status >= 500 else "invalid_request_error"


def error_body(exc: GatewayError, request_id: str) -> bytes:
    _, kind = error_status(exc)
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": exc.message}, "request_id": request_id})
