"""The built-in `local` model: no network, a deterministic reply at a realistic token pace.

It lets the platform run (and be demonstrated) out of the box. The reply depends only on the
request, so tests can assert it exactly; usage is counted with the o200k tokenizer.
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from django.conf import settings

from ..routing import LaneSpec
from ..tokens import count_messages, encoding
from ..types import ChatRequest, Chunk, Completion, Outcome, Usage
from .base import Provider


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def reply_for(req: ChatRequest) -> str:
    last = req.messages[-1]
    if last.get("role") == "tool":
        return f"The tool returned: {_text(last.get('content'))[:400]}"
    users = [m for m in req.messages if m.get("role") == "user"]
    said = " ".join(_text(users[-1].get("content")).split())[:400] if users else ""
    return f"Hello from the built-in local model. You said: {said}"


def tool_call_for(req: ChatRequest) -> dict | None:
    """Call a tool when told to (`required` / a named function) or when the user names one."""
    tools = req.tools or []
    choice = req.params.get("tool_choice", "auto")
    if not tools or choice == "none" or req.messages[-1].get("role") == "tool":
        return None
    names = [t["function"]["name"] for t in tools]
    users = [m for m in req.messages if m.get("role") == "user"]
    text = _text(users[-1].get("content")) if users else ""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    elif choice == "required":
        name = next((n for n in names if n in text), names[0])
    else:
        name = next((n for n in names if n in text), None)
    if name is None:
        return None
    arguments = orjson.dumps({"input": " ".join(text.split())[:200]}).decode()
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


class LocalProvider(Provider):
    ENCODING = "o200k_base"

    def _pace(self, lane: LaneSpec) -> float:
        tps = float(lane.options.get("tokens_per_second", settings.GATEWAY["LOCAL_TOKENS_PER_SECOND"]))
        return 1.0 / tps if tps > 0 else 0.0

    def _plan(self, req: ChatRequest) -> tuple[list[str], str, int, dict | None]:
        """The reply as token pieces, its finish reason, its token count and any tool call."""
        call = tool_call_for(req)
        if call is not None:
            return [], "tool_calls", len(encoding(self.ENCODING).encode(call["function"]["arguments"])) + 5, call
        text = reply_for(req)
        finish = "stop"
        for stop in req.stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        tokens = encoding(self.ENCODING).encode(text)
        if req.max_tokens is not None and len(tokens) > req.max_tokens:
            tokens = tokens[: req.max_tokens]
            finish = "length"
        enc = encoding(self.ENCODING)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = [decoder.decode(enc.decode_single_token_bytes(t)) for t in tokens]
        return pieces, finish, len(tokens), call

    def _usage(self, lane: LaneSpec, req: ChatRequest, completion_tokens: int, n: int) -> Usage:
        prompt = count_messages(req.messages, lane.upstream_model, req.tools)
        return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens * n)

    async def complete(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> Completion:
        outcome.provider_request_id = f"local-{uuid.uuid4().hex[:16]}"
        pieces, finish, count, call = self._plan(req)
        pace = self._pace(lane)
        if pace:
            await asyncio.sleep(pace * max(count, 1))
        outcome.first_token_at = time.perf_counter()
        n = int(req.params.get("n", 1))
        message = {"role": "assistant", "content": None if call else "".join(pieces), "refusal": None}
        if call:
            message["tool_calls"] = [call]
        usage = self._usage(lane, req, count, n)
        outcome.usage, outcome.finish_reason, outcome.upstream_model = usage, finish, lane.upstream_model
        if outcome.completion_text_parts is not None:
            outcome.completion_text_parts.append(message["content"] or "")
        return Completion(obj={
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": lane.upstream_model,
            "system_fingerprint": "local",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": usage.to_openai(),
        })

    async def stream(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> AsyncIterator[Chunk]:
        outcome.provider_request_id = f"local-{uuid.uuid4().hex[:16]}"
        outcome.upstream_model = lane.upstream_model
        pieces, finish, count, call = self._plan(req)
        pace = self._pace(lane)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": lane.upstream_model, "system_fingerprint": "local"}
        n = int(req.params.get("n", 1))

        def chunk(delta: dict, finish_reason: str | None = None, index: int = 0) -> Chunk:
            return Chunk(obj={**base, "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        # `n` choices, as OpenAI streams them: each event carries one choice, told apart by index.
        for i in range(n):
            yield chunk({"role": "assistant", "content": "", "refusal": None}, index=i)
        if call:
            if pace:
                await asyncio.sleep(pace * count)
            outcome.first_token_at = time.perf_counter()
            args = call["function"]["arguments"]
            for i in range(n):
                yield chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                             "function": {"name": call["function"]["name"], "arguments": ""}}]}, index=i)
                for start in range(0, len(args), 16):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[start:start + 16]}}]}, index=i)
        for piece in pieces:
            if pace:
                await asyncio.sleep(pace)
            if outcome.first_token_at is None:
                outcome.first_token_at = time.perf_counter()
            if outcome.completion_text_parts is not None:
                outcome.completion_text_parts.append(piece)
            for i in range(n):
                yield chunk({"content": piece}, index=i)
        outcome.finish_reason = finish
        for i in range(n):
            yield chunk({}, finish, index=i)
        usage = self._usage(lane, req, count, n)
        outcome.usage = usage
        yield Chunk(obj={**base, "choices": [], "usage": usage.to_openai()}, usage_only=True)
