"""A fake Anthropic Messages server speaking the real wire protocol (JSON and named SSE events).

Replies are deterministic: ``"Echo: <last user text>"`` (directives removed; a tool_result
block reads as ``"tool said <content>"``), split into ``chunks`` slices. Usage: input_tokens =
words of system and every message + 3 per message; cache tokens only from ``[[cache:R,C]]``;
output_tokens = number of slices sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.support.directives import (
    DirectiveError,
    Directives,
    Faults,
    split_even,
    strip_directives,
    truncate_at_stop,
    word_count,
)
from tests.support.harness import RECORD, FakeServer, json_response, loads, new_id

# OpenAI finish reasons map onto Anthropic stop reasons, so one prompt drives both fakes.
STOP_ALIASES = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal", "tool_calls": "tool_use"}
DEFAULT_STOP_SEQUENCE = "\n\nHuman:"
STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (fake fault)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
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
MODELS: tuple[tuple[str, str, str], ...] = (
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
    ("claude-opus-4-6", "Claude Opus 4.6", "2026-02-04T00:00:00Z"),
    ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
)


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


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class FakeAnthropic(FakeServer):
    """Fake ``/v1/messages``, ``/v1/messages/count_tokens`` and ``/v1/models``."""

    vendor = "anthropic"
    sdk_suffix = ""
    default_port = 8002
    models = MODELS

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            web.post("/v1/messages", self.messages),
            web.post("/v1/messages/count_tokens", self.count_tokens),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
        ]

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def error(status: int, type_: str, message: str, headers: dict[str, str]) -> web.Response:
        return json_response(error_body(type_, message, headers["request-id"]), status=status, headers=headers)

    def header_error(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """Anthropic checks the key, then ``anthropic-version``, before the body."""
        key = request.headers.get("x-api-key")
        auth = request.headers.get("Authorization", "")
        if key is None and auth.startswith("Bearer "):
            key = auth[7:]
        if not key:
            return self.error(401, "authentication_error", "x-api-key header is required", headers)
        if self.api_key is not None and key != self.api_key:
            return self.error(401, "authentication_error", "invalid x-api-key", headers)
        if not request.headers.get("anthropic-version"):
            return self.error(400, "invalid_request_error", "anthropic-version: header is required", headers)
        return None

    def status_fault(self, faults: Faults, headers: dict[str, str]) -> web.Response:
        status = faults.status or 500
        type_, message = STATUS_ERRORS[status]
        if status == 429:
            headers["retry-after"] = str(max(1, -(-faults.retry_after_ms // 1000)))
            headers["retry-after-ms"] = str(faults.retry_after_ms)
            headers["anthropic-ratelimit-requests-remaining"] = "0"
        return self.error(status, type_, message, headers)

    def model_info(self, model: tuple[str, str, str]) -> dict[str, Any]:
        model_id, name, created = model
        return {
            "type": "model",
            "id": model_id,
            "display_name": name,
            "created_at": created,
            "capabilities": None,
            "max_input_tokens": 200000,
            "max_tokens": 64000,
        }

    # -- endpoints --------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_", 16)}
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        data = [self.model_info(m) for m in self.models]
        return json_response(
            {"data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": False},
            headers=headers,
        )

    async def get_model(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_", 16)}
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        for model in self.models:
            if model[0] == request.match_info["model"]:
                return json_response(self.model_info(model), headers=headers)
        return self.error(404, "not_found_error", f"model: {request.match_info['model']}", headers)

    async def count_tokens(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = loads(raw)
        self._record(request, body, raw)
        headers = {"request-id": new_id("req_", 16)}
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        if (problem := validate(body, need_max_tokens=False)) is not None:
            return self.error(400, "invalid_request_error", problem, headers)
        return json_response({"input_tokens": count_input_tokens(body)}, headers=headers)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = loads(raw)
        self._record(request, body, raw)
        rid = new_id("req_", 16)
        headers = {"request-id": rid}
        text, from_tool = source_text(body.get("messages") if isinstance(body, dict) else None)
        try:
            directives = self.directives_in(text)
            faults = self.faults_for(request, directives)
        except DirectiveError as exc:
            return self.error(400, "invalid_request_error", f"fake: {exc}", headers)
        await self.wait_before_answer(faults)
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        if faults.status:
            return self.status_fault(faults, headers)
        if (problem := validate(body)) is not None:
            return self.error(400, "invalid_request_error", problem, headers)

        plan = self.plan(body, text, from_tool, directives, faults)
        usage = self.usage(body, directives, plan.tokens)
        mid = new_id("msg_")
        if body.get("stream"):
            events = self.stream_events(mid, body["model"], plan, usage, faults, rid)
            return await self.send_stream(request, events, faults, headers)
        payload = orjson.dumps(self.message(mid, body["model"], plan, usage))
        if faults.cut_after is not None:
            return await self.send_cut_body(request, payload, headers)
        if faults.malformed:
            request[RECORD].outcome = "malformed"
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, headers=headers, content_type="application/json")

    # -- answer building --------------------------------------------------------------------

    def plan(self, body: dict[str, Any], text: str, from_tool: bool, directives: Directives, faults: Faults) -> Plan:
        """Decide content blocks, truncation and the stop reason."""
        chunks = directives.chunks or self.chunks
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
            if plan.stop_reason == "stop_sequence":
                plan.stop_sequence = plan.stop_sequence or (stops[0] if stops else DEFAULT_STOP_SEQUENCE)
            else:
                plan.stop_sequence = None
        return plan

    @staticmethod
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

    @staticmethod
    def content_block(block: Block, *, complete: bool) -> dict[str, Any]:
        if block.tool_id is None:
            return {"type": "text", "text": "".join(block.pieces) if complete else "", "citations": None}
        return {
            "type": "tool_use",
            "id": block.tool_id,
            "name": block.tool_name,
            "input": block.tool_input if complete else {},
            "caller": {"type": "direct"},
        }

    def message(self, mid: str, model: str, plan: Plan, usage: dict[str, Any], *, started: bool = False) -> dict[str, Any]:
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [] if started else [self.content_block(b, complete=True) for b in plan.blocks],
            "stop_reason": None if started else plan.stop_reason,
            "stop_sequence": None if started else plan.stop_sequence,
            "stop_details": None,
            "container": None,
            "usage": usage,
        }

    def stream_events(
        self, mid: str, model: str, plan: Plan, usage: dict[str, Any], faults: Faults, rid: str
    ) -> list[bytes]:
        """Every named SSE event of the stream, in Anthropic's order, ending with message_stop."""
        start_usage = {**usage, "output_tokens": min(1, usage["output_tokens"])}
        out = [sse("message_start", {"type": "message_start", "message": self.message(mid, model, plan, start_usage, started=True)})]
        ping = sse("ping", {"type": "ping"})
        for index, block in enumerate(plan.blocks):
            out.append(sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": self.content_block(block, complete=False)}))
            if index == 0:
                out.append(ping)
            if block.tool_id is None:
                deltas = [{"type": "text_delta", "text": p} for p in block.pieces]
            else:
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in ["", *block.pieces]]
            out.extend(sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas)
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        if not plan.blocks:
            out.append(ping)
        delta_usage = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens", "server_tool_use")}
        out.append(sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": plan.stop_reason, "stop_sequence": plan.stop_sequence, "stop_details": None, "container": None},
            "usage": delta_usage,
        }))
        if faults.malformed:
            bad = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "oops\n\n'
            out.insert(min(3, len(out)), bad)
        if faults.stream_error_after is not None:
            err = sse("error", error_body("overloaded_error", "Overloaded", rid))
            return [*out[: faults.stream_error_after], err]
        out.append(sse("message_stop", {"type": "message_stop"}))
        return out


if __name__ == "__main__":
    FakeAnthropic.main()
