"""Anthropic's Messages API behind the platform's OpenAI Chat Completions vocabulary.

Requests are validated OpenAI-shaped `ChatRequest`s; this adapter rewrites them into a
`messages.create` call with the official async SDK (one client per provider instance, so one
connection pool per base URL + credential + event loop) and rewrites the answer, or the stream
of events, back into `chat.completion` / `chat.completion.chunk` objects. A request that came in
through the Anthropic front door (`req.native`) is forwarded as its client sent it instead.

The mapping functions (`to_anthropic`, `to_openai_completion`, `StreamMapper`) are pure, so
they can be tested without a network.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2  # the anthropic SDK's HTTP stack; its errors surface unwrapped mid-stream

from ..errors import GatewayError
from ..lane_policy import policy_for
from ..routing import LaneSpec
from ..types import ChatRequest, Chunk, Completion, Outcome, Usage
from .base import Provider, UpstreamError, map_upstream_status, parse_retry_after, scrub, timeouts

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; lanes may override it in options

# Anthropic's stop_reason -> OpenAI's finish_reason (anything else reads as "stop").
FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# What this SDK version's `messages.create` takes as arguments; anything else rides in extra_body.
_SDK_PARAMS = frozenset(inspect.signature(anthropic.resources.AsyncMessages.create).parameters) - {"self"}

# Prefixes of Anthropic's 400 messages that mean the prompt does not fit the model.
_CONTEXT_MESSAGES = ("prompt is too long", "input length and `max_tokens` exceed context limit")


# -- request mapping -------------------------------------------------------------------------


def _invalid(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="unsupported_content")


def _texts(content: Any, param: str) -> list[str]:
    """The non-empty texts of a system/developer/tool message (a string or text parts)."""
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        return []
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind not in ("text", "refusal"):
            raise _invalid(f"'{param}[{j}]': only text parts are supported here by Anthropic models.", f"{param}[{j}].type")
        text = part["text"] if kind == "text" else str(part.get("refusal") or "")
        if text:
            texts.append(text)
    return texts


def _data_url(url: str, param: str) -> tuple[str, str]:
    """`data:<media type>;base64,<data>` as (media type, data)."""
    header, sep, data = url.partition(",")
    media_type, _, encoding = header[5:].partition(";")
    if not sep or encoding != "base64" or not media_type or not data:
        raise _invalid(f"'{param}': data URLs must look like data:<media type>;base64,<data>.", param)
    return media_type, data


def _image_block(part: dict, param: str) -> dict:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _invalid(f"'{param}.image_url.url' is required.", f"{param}.image_url.url")
    if url.startswith("data:"):
        media_type, data = _data_url(url, f"{param}.image_url.url")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _file_block(part: dict, param: str) -> dict:
    """OpenAI's inline `file_data` becomes a document block; uploaded `file_id`s mean nothing here."""
    file = part.get("file") if isinstance(part.get("file"), dict) else {}
    data = file.get("file_data")
    if not isinstance(data, str) or not data:
        raise _invalid(f"'{param}': Anthropic models accept files only as inline file_data.", f"{param}.file")
    if data.startswith("data:"):
        media_type, data = _data_url(data, f"{param}.file.file_data")
    else:
        media_type = "application/pdf"
    block: dict[str, Any] = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if file.get("filename"):
        block["title"] = file["filename"]
    return block


def _content_blocks(content: Any, param: str) -> list[dict]:
    """User/assistant content (string or parts) as Anthropic blocks; empty texts are dropped
    because Anthropic refuses empty text blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        return []
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            if part.get("refusal"):
                blocks.append({"type": "text", "text": str(part["refusal"])})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{param}[{j}]"))
        elif kind == "file":
            blocks.append(_file_block(part, f"{param}[{j}]"))
        else:
            raise _invalid(f"'{param}[{j}]': content parts of type {kind!r} are not supported by Anthropic models.", f"{param}[{j}].type")
    return blocks


def _tool_input(arguments: Any, param: str) -> dict:
    """A tool call's JSON arguments as the object Anthropic wants (refused when not an object,
    rather than silently sending the model different arguments than it produced)."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested past ~1000 levels
        value = None
    if not isinstance(value, dict):
        raise GatewayError(400, f"'{param}' must be a JSON object encoded as a string.", param=param, code="invalid_tool_arguments")
    return value


def _append(messages: list[dict], role: str, blocks: list[dict]) -> None:
    """Add blocks, merging with the previous message of the same role (Anthropic wants
    user/assistant alternation, OpenAI clients often send runs of one role)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def map_messages(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """OpenAI messages as Anthropic's (`system`, `messages`)."""
    system: list[str] = []
    out: list[dict] = []
    legacy_call_id: str | None = None  # the deprecated `function_call` has no id; pair it with the next `function` reply
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        param = f"messages[{i}].content"
        if role in ("system", "developer"):
            system.extend(_texts(content, param))
        elif role == "user":
            _append(out, "user", _content_blocks(content, param))
        elif role == "assistant":
            blocks = _content_blocks(content, param)
            for k, call in enumerate(message.get("tool_calls") or []):
                function = call["function"]
                blocks.append({
                    "type": "tool_use",
                    "id": call.get("id") or f"toolu_{i}_{k}",
                    "name": function["name"],
                    "input": _tool_input(function.get("arguments"), f"messages[{i}].tool_calls[{k}].function.arguments"),
                })
            if isinstance(message.get("function_call"), dict):
                function = message["function_call"]
                legacy_call_id = f"toolu_fc_{i}"
                blocks.append({
                    "type": "tool_use",
                    "id": legacy_call_id,
                    "name": function.get("name") or "function",
                    "input": _tool_input(function.get("arguments"), f"messages[{i}].function_call.arguments"),
                })
            _append(out, "assistant", blocks)
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id") if role == "tool" else legacy_call_id
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id or f"toolu_fc_{i}"}
            text = "\n".join(_texts(content, param))
            if text:
                result["content"] = text
            _append(out, "user", [result])
    return ("\n\n".join(system) or None), out


def _tool_choice(choice: Any, parallel: Any) -> dict | None:
    if choice is None:
        mapped: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}  # disable_parallel_tool_use is not allowed with `none`
    else:
        mapped = {"type": "tool", "name": choice["function"]["name"]}
    if mapped is not None and parallel is False:
        mapped["disable_parallel_tool_use"] = True
    return mapped


def to_anthropic(lane: LaneSpec, req: ChatRequest) -> dict[str, Any]:
    """Keyword arguments for `messages.create` (without `stream`).

    Not forwarded, as Anthropic has no equivalent: seed, presence_penalty, frequency_penalty,
    logprobs, top_logprobs, logit_bias, response_format and reasoning_effort. `n` > 1 is
    refused (Anthropic returns one answer per call).
    """
    params = req.params
    if params.get("n", 1) != 1:
        raise GatewayError(400, f"Model '{req.model}' does not support 'n' greater than 1.", param="n", code="unsupported_parameter")
    system, messages = map_messages(req.messages)
    max_tokens = req.max_tokens if req.max_tokens is not None else int(lane.options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
    kwargs: dict[str, Any] = {"model": lane.upstream_model, "max_tokens": max_tokens, "messages": messages}
    if system:
        kwargs["system"] = system
    if "temperature" in params:
        kwargs["temperature"] = min(float(params["temperature"]), 1.0)  # OpenAI allows up to 2
    if "top_p" in params:
        kwargs["top_p"] = params["top_p"]
    if req.stop:
        kwargs["stop_sequences"] = req.stop
    if req.user:
        kwargs["metadata"] = {"user_id": req.user}
    if req.tools:
        kwargs["tools"] = [
            {
                "name": tool["function"]["name"],
                **({"description": tool["function"]["description"]} if tool["function"].get("description") else {}),
                "input_schema": tool["function"].get("parameters") or {"type": "object", "properties": {}},
            }
            for tool in req.tools
        ]
        choice = _tool_choice(params.get("tool_choice"), params.get("parallel_tool_calls"))
        if choice is not None:
            kwargs["tool_choice"] = choice
    return kwargs


def native_request(lane: LaneSpec, req: ChatRequest) -> dict[str, Any] | None:
    """Keyword arguments for `messages.create` from the body an Anthropic front door received,
    forwarded unchanged (thinking, cache_control, top_k, document and image blocks...) but for
    the lane's upstream model; None when the request did not come in Anthropic's protocol."""
    if req.native is None or req.native[0] != "anthropic":
        return None
    body = req.native[1]
    kwargs: dict[str, Any] = {"model": lane.upstream_model, "messages": body["messages"],
                              "max_tokens": req.max_tokens if req.max_tokens is not None else body["max_tokens"]}
    rest = {k: v for k, v in body.items() if k not in ("model", "messages", "max_tokens", "stream")}
    if rest:
        kwargs["extra_body"] = rest  # merged into the JSON body as it is, whatever the SDK version knows
    return kwargs


def request_for(lane: LaneSpec, req: ChatRequest) -> dict[str, Any]:
    return native_request(lane, req) or to_anthropic(lane, req)


# -- response mapping ------------------------------------------------------------------------


def finish_reason_for(stop_reason: str | None) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def usage_from_anthropic(usage: Any) -> Usage:
    """Anthropic counts cached input apart from `input_tokens`; OpenAI's prompt count includes it."""
    read = getattr(usage, "cache_read_input_tokens", None) or 0
    created = getattr(usage, "cache_creation_input_tokens", None) or 0
    return Usage(
        prompt_tokens=(getattr(usage, "input_tokens", None) or 0) + read + created,
        completion_tokens=getattr(usage, "output_tokens", None) or 0,
        cached_tokens=read,
        cache_creation_tokens=created,
    )


def to_openai_completion(message: Any, created: int | None = None) -> dict:
    """An Anthropic `Message` as an OpenAI `chat.completion`; thinking blocks (only ever asked
    for through the Anthropic front door) become `reasoning_content` and `reasoning_signature`."""
    texts: list[str] = []
    calls: list[dict] = []
    thinking: list[str] = []
    signature = None
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "thinking":
            thinking.append(block.thinking)
            signature = block.signature or signature
        elif block.type == "tool_use":
            calls.append({
                "id": block.id,
                "type": "function",
                "function": {"name": block.name, "arguments": json.dumps(block.input)},
            })
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["reasoning_content"] = "".join(thinking)
        reply["reasoning_signature"] = signature
    return {
        "id": f"chatcmpl-{message.id}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": message.model,
        "choices": [{
            "index": 0,
            "message": reply,
            "logprobs": None,
            "finish_reason": finish_reason_for(message.stop_reason) or "stop",
        }],
        "usage": usage_from_anthropic(message.usage).to_openai(),
    }


class StreamMapper:
    """Turns Anthropic's stream events into `chat.completion.chunk` dicts, one event at a time,
    recording what the platform needs in `outcome` as it goes."""

    def __init__(self, model: str, outcome: Outcome) -> None:
        self.outcome = outcome
        self.id = f"chatcmpl-{uuid.uuid4().hex}"  # replaced by message_start's id
        self.created = int(time.time())
        self.model = model
        self.usage = Usage()
        self.tool_index: dict[int, int] = {}  # content block index -> OpenAI tool call index
        self.finished = False

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def _content(self, delta: dict) -> dict:
        if self.outcome.first_token_at is None:
            self.outcome.first_token_at = time.perf_counter()
        text = delta.get("content")
        if text and self.outcome.completion_text_parts is not None:
            self.outcome.completion_text_parts.append(text)
        return self._chunk(delta)

    def _record_usage(self, usage: Any) -> None:
        """message_start carries the input counts; message_delta the cumulative output count
        (and, on newer API versions, the input counts again: any it omits are kept)."""
        previous = self.usage
        fresh_input = previous.prompt_tokens - previous.cached_tokens - previous.cache_creation_tokens

        def pick(name: str, old: int) -> int:
            value = getattr(usage, name, None)
            return old if value is None else value

        read = pick("cache_read_input_tokens", previous.cached_tokens)
        created = pick("cache_creation_input_tokens", previous.cache_creation_tokens)
        self.usage = Usage(
            prompt_tokens=pick("input_tokens", fresh_input) + read + created,
            completion_tokens=pick("output_tokens", previous.completion_tokens),
            cached_tokens=read,
            cache_creation_tokens=created,
        )
        self.outcome.usage = self.usage

    def usage_chunk(self) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage.to_openai(),
        }

    def feed(self, event: Any) -> dict | None:
        """The chunk for one event, or None for events OpenAI has no word for (pings, block
        stops, empty fragments). Thinking deltas (asked for only through the Anthropic front
        door) become `reasoning_content` and `reasoning_signature` deltas."""
        kind = event.type
        if kind == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta":
                return self._content({"content": delta.text}) if delta.text else None
            if delta.type == "input_json_delta" and event.index in self.tool_index and delta.partial_json:
                k = self.tool_index[event.index]
                return self._content({"tool_calls": [{"index": k, "function": {"arguments": delta.partial_json}}]})
            if delta.type == "thinking_delta" and delta.thinking:  # output too: a cut stream bills it
                return self._content({"reasoning_content": delta.thinking})
            if delta.type == "signature_delta" and delta.signature:
                return self._content({"reasoning_signature": delta.signature})
            return None
        if kind == "content_block_start":
            block = event.content_block
            if block.type == "tool_use":
                k = self.tool_index[event.index] = len(self.tool_index)
                call = {"index": k, "id": block.id, "type": "function", "function": {"name": block.name, "arguments": ""}}
                return self._content({"tool_calls": [call]})
            if block.type == "text" and block.text:
                return self._content({"content": block.text})
            return None
        if kind == "message_start":
            message = event.message
            self.id = f"chatcmpl-{message.id}"
            self.model = message.model or self.model
            self.outcome.upstream_model = self.model
            self._record_usage(message.usage)
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "message_delta":
            self._record_usage(event.usage)
            finish = finish_reason_for(event.delta.stop_reason) or "stop"
            self.outcome.finish_reason = finish
            return self._chunk({}, finish)
        if kind == "message_stop":
            self.finished = True
        return None


# -- the provider ----------------------------------------------------------------------------


class AnthropicProvider(Provider):
    kind = "anthropic"

    def __init__(self, base_url: str, api_key: str | None) -> None:
        super().__init__(base_url, api_key)
        connect, total = timeouts()
        self.client = anthropic.AsyncAnthropic(
            base_url=base_url,
            api_key=api_key or "unset",
            max_retries=0,  # the platform retries (and fails over) itself
            timeout=anthropic.Timeout(total, connect=connect),
        )

    async def aclose(self) -> None:
        await self.client.close()

    def _status_error(self, exc: anthropic.APIStatusError) -> UpstreamError:
        message = exc.api_message or ""
        code = exc.error_code or exc.type
        if exc.status_code in (400, 413) and message.lower().startswith(_CONTEXT_MESSAGES):
            code = "context_length_exceeded"
        return map_upstream_status(exc.status_code, message, code, parse_retry_after(exc.response.headers), self.kind)

    async def _create(self, kwargs: dict[str, Any], stream: bool, lane: LaneSpec) -> Any:
        """`messages.create`, with the SDK's failures as the platform's UpstreamErrors."""
        policy = policy_for(lane)
        connect, total = timeouts()
        total = policy.timeouts.total_s or total
        idle = min(policy.timeouts.idle_s, total) if policy.timeouts.idle_s else total
        timeout = anthropic.Timeout(total, connect=policy.timeouts.connect_s or connect, read=idle)
        extra = {name: kwargs.pop(name) for name in list(kwargs) if name not in _SDK_PARAMS}
        if extra:  # e.g. temperature, which newer SDK versions no longer take as an argument
            kwargs["extra_body"] = {**extra, **kwargs.get("extra_body", {})}
        try:
            return await self.client.messages.create(**kwargs, stream=stream, timeout=timeout)
        except anthropic.APIStatusError as exc:
            raise self._status_error(exc) from None
        except anthropic.APITimeoutError:
            raise UpstreamError(504, f"The provider '{self.kind}' did not answer in time.", code="upstream_timeout", retryable=True) from None
        except anthropic.APIConnectionError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "connection error"
            raise UpstreamError(502, f"Could not reach the provider '{self.kind}': {cause}.", code="upstream_unreachable", retryable=True) from None
        except (anthropic.APIResponseValidationError, json.JSONDecodeError):
            raise UpstreamError(502, f"The provider '{self.kind}' sent a malformed answer.", code="upstream_malformed", retryable=True) from None

    async def complete(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> Completion:
        message = await self._create(request_for(lane, req), stream=False, lane=lane)
        outcome.first_token_at = time.perf_counter()
        outcome.provider_request_id = message._request_id
        obj = to_openai_completion(message)
        outcome.upstream_model = message.model
        outcome.usage = usage_from_anthropic(message.usage)
        outcome.finish_reason = obj["choices"][0]["finish_reason"]
        if outcome.completion_text_parts is not None:
            outcome.completion_text_parts.append(obj["choices"][0]["message"]["content"] or "")
        return Completion(obj=obj)

    async def stream(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> AsyncIterator[Chunk]:
        upstream = await self._create(request_for(lane, req), stream=True, lane=lane)
        outcome.provider_request_id = upstream.response.headers.get("request-id")
        mapper = StreamMapper(lane.upstream_model, outcome)
        try:
            async for event in upstream:
                chunk = mapper.feed(event)
                if chunk is not None:
                    yield Chunk(obj=chunk)
                if mapper.finished:
                    break
        except anthropic.APIStatusError as exc:  # an `error` event inside a 200 stream
            raise UpstreamError(502, f"The provider '{self.kind}' reported an error mid-stream: {scrub(exc.api_message or str(exc.type))}", code="upstream_stream_error") from None
        except (anthropic.APITimeoutError, httpx2.TimeoutException):
            raise UpstreamError(504, f"The provider '{self.kind}' went silent mid-stream.", code="upstream_idle_timeout") from None
        except (anthropic.APIConnectionError, httpx2.HTTPError, httpx2.StreamError):
            raise UpstreamError(502, f"The provider '{self.kind}' stream broke off.", code="upstream_stream_cut") from None
        except json.JSONDecodeError:  # an event that is not JSON
            raise UpstreamError(502, f"The provider '{self.kind}' sent a malformed stream event.", code="upstream_malformed") from None
        finally:
            # Closing an unfinished response drops the connection, so the provider stops generating.
            await upstream.close()
        if not mapper.finished:
            raise UpstreamError(502, f"The provider '{self.kind}' stream ended before it was complete.", code="upstream_stream_cut")
        yield Chunk(obj=mapper.usage_chunk(), usage_only=True)
