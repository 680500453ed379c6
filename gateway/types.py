"""The normalized request and results every front door, the chat session and the provider
adapters share.

The request's messages and parameters use one documented vocabulary, OpenAI Chat's message
schema (roles, content parts, tool calls), which every adapter translates to its vendor and
every front door translates its protocol into. Results are the providers' chunks and
completions in that vocabulary, read through neutral accessors (`Chunk.choices()`,
`Completion.choices()`, `.usage`) by doors that speak another protocol; the OpenAI door
forwards their bytes untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

# Parameters forwarded to providers (everything else a client sends is ignored, not refused).
PASSTHROUGH_PARAMS = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "reasoning_effort",
)


@dataclass(slots=True)
class ChatRequest:
    """A validated chat request in OpenAI's vocabulary (the platform's lingua franca)."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    feature: str | None = None
    metadata: dict[str, str] | None = None
    trim_oldest: bool = False  # opt-in: drop the oldest turns to fit the context window
    # The body as the front door received it, (protocol, body): a lane that speaks that protocol
    # may forward it instead of translating the normalized fields (None: translate).
    native: tuple[str, dict] | None = None

    @property
    def tools(self) -> list[dict] | None:
        return self.params.get("tools")

    @property
    def stop(self) -> list[str]:
        stop = self.params.get("stop")
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else list(stop)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict:
        data: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        return data

    @classmethod
    def from_openai(cls, data: dict | None) -> Usage | None:
        if not data:
            return None
        details = data.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=int(data.get("prompt_tokens") or 0),
            completion_tokens=int(data.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
        )


@dataclass(slots=True)
class Outcome:
    """What a provider call reported, filled in by the adapter as the call proceeds."""

    provider_request_id: str | None = None
    upstream_model: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None  # perf_counter() when the first content arrived
    completion_text_parts: list[str] | None = None  # kept only when the tenant stores content


class _JsonPayload:
    """Bytes when forwarded untouched, a dict when built or inspected; each made on demand."""

    __slots__ = ()
    raw: bytes | None
    obj: dict | None

    @property
    def data(self) -> bytes:
        if self.raw is None:
            self.raw = orjson.dumps(self.obj)
        return self.raw

    @property
    def as_dict(self) -> dict:
        if self.obj is None:
            self.obj = orjson.loads(self.raw)
        return self.obj


class ChoiceDelta(NamedTuple):
    """One choice's part of a streamed delta, protocol-neutral."""

    index: int
    role: str | None
    text: str | None
    reasoning: str | None  # a reasoning ("thinking") delta, where the provider gives one
    tool_calls: list[dict] | None  # [{"index", "id", "name", "arguments"}], each but index optional
    finish_reason: str | None


def _tool_call_deltas(calls: Any) -> list[dict] | None:
    if not calls:
        return None
    out = []
    for call in calls:
        function = call.get("function") or {}
        out.append({"index": call.get("index", 0), "id": call.get("id"), "name": function.get("name"),
                    "arguments": function.get("arguments")})
    return out


@dataclass(slots=True)
class Chunk(_JsonPayload):
    """One streamed delta (a `chat.completion.chunk` in the normalized vocabulary): the chat
    session's delta event, see gateway/chat/events.py."""

    raw: bytes | None = None
    obj: dict | None = None
    usage_only: bool = False  # the final usage chunk (choices == [])
    batched: bool = False  # another chunk is ready right behind this one (send them together)
    seq: int = 0  # its number in the call's event sequence (set by the chat session)

    kind = "delta"

    def choices(self) -> list[ChoiceDelta]:
        out = []
        for choice in self.as_dict.get("choices") or ():
            delta = choice.get("delta") or {}
            out.append(ChoiceDelta(choice.get("index", 0), delta.get("role"), delta.get("content"),
                                   delta.get("reasoning_content") or delta.get("reasoning"),
                                   _tool_call_deltas(delta.get("tool_calls")), choice.get("finish_reason")))
        return out

    @property
    def usage(self) -> Usage | None:
        return Usage.from_openai(self.as_dict.get("usage"))


class ChoiceMessage(NamedTuple):
    """One choice of a whole answer, protocol-neutral."""

    index: int
    text: str | None
    reasoning: str | None
    tool_calls: list[dict] | None  # [{"id", "name", "arguments"}]
    finish_reason: str | None
    refusal: str | None


@dataclass(slots=True)
class Completion(_JsonPayload):
    """A whole answer (a `chat.completion` in the normalized vocabulary)."""

    raw: bytes | None = None
    obj: dict | None = None

    def choices(self) -> list[ChoiceMessage]:
        out = []
        for choice in self.as_dict.get("choices") or ():
            message = choice.get("message") or {}
            calls = [{"id": c.get("id"), "name": (c.get("function") or {}).get("name"),
                      "arguments": (c.get("function") or {}).get("arguments")}
                     for c in message.get("tool_calls") or ()] or None
            out.append(ChoiceMessage(choice.get("index", 0), message.get("content"),
                                     message.get("reasoning_content") or message.get("reasoning"), calls,
                                     choice.get("finish_reason"), message.get("refusal")))
        return out

    @property
    def usage(self) -> Usage | None:
        return Usage.from_openai(self.as_dict.get("usage"))


FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


def openai_finish_reason(value: str | None) -> str | None:
    """Whatever a provider said, one of OpenAI's values (unknown values read as `stop`)."""
    if value is None:
        return None
    return value if value in FINISH_REASONS else "stop"
