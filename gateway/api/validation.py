"""Validate a chat request body at the boundary, in microseconds, into a ChatRequest.

Every failure is a 400 naming the offending parameter, raised before any provider call or
charge. Unknown top-level fields are ignored (not forwarded), as OpenAI-compatible servers do.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from django.conf import settings

from ..structured import validate_schema
from ..types import PASSTHROUGH_PARAMS, ChatRequest
from .errors import GatewayError, invalid

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
LEADING_ROLES = frozenset({"system", "developer"})
PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")

_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_json(body: bytes) -> dict:
    if not body:
        raise invalid("The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    return data


def _content_length(content: Any, param: str) -> int:
    """Check a message's content (string or parts) and return its character count."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        raise invalid(f"Invalid type for '{param}': expected a string or an array of content parts.", param)
    if not content:
        raise invalid(f"'{param}' must not be an empty array.", param)
    total = 0
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            raise invalid(
                f"Invalid content part at '{param}[{j}]': 'type' must be one of "
                f"{', '.join(sorted(PART_TYPES))}.",
                f"{param}[{j}].type",
            )
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"'{param}[{j}].text' must be a string.", f"{param}[{j}].text")
            total += len(text)
    return total


def _validate_messages(messages: Any) -> list[dict]:
    limits = settings.GATEWAY
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages")
    if len(messages) > limits["MAX_MESSAGES"]:
        raise invalid(
            f"Too many messages: {len(messages)} > {limits['MAX_MESSAGES']}.", "messages"
        )
    chars = 0
    seen_other = False
    seen_user = False
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{param}' must be an object.", param)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(
                f"Invalid value for '{param}.role': {role!r}. Supported roles are "
                "'system', 'developer', 'user', 'assistant' and 'tool'.",
                f"{param}.role",
            )
        if role in LEADING_ROLES:
            if seen_other:
                raise invalid(
                    f"'{param}': a {role} message may only come first, before other messages.",
                    f"{param}.role",
                )
        else:
            seen_other = True
        content = message.get("content")
        if role == "assistant" and content is None:
            if not message.get("tool_calls") and not message.get("function_call"):
                raise invalid(
                    f"'{param}.content' is required unless the assistant message has tool_calls.",
                    f"{param}.content",
                )
        else:
            if content is None:
                raise invalid(f"Missing required parameter: '{param}.content'.", f"{param}.content")
            length = _content_length(content, f"{param}.content")
            if length == 0 and role in ("user", "system", "developer") and isinstance(content, str):
                raise invalid(f"'{param}.content' must not be empty.", f"{param}.content")
            chars += length
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise invalid(
                f"Missing required parameter: '{param}.tool_call_id'.", f"{param}.tool_call_id"
            )
        if role == "assistant" and "tool_calls" in message:
            _validate_tool_calls(message["tool_calls"], f"{param}.tool_calls")
        if role == "user":
            seen_user = True
    if not seen_user:
        raise invalid("'messages' must contain at least one user message.", "messages")
    if chars > limits["MAX_CONTENT_CHARS"]:
        raise invalid(
            f"The messages are too long: {chars} characters > {limits['MAX_CONTENT_CHARS']}.",
            "messages",
        )
    return messages


def _validate_tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise invalid(f"'{param}' must be an array.", param)
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"'{param}[{k}].function.name' is required.", f"{param}[{k}].function")


def _validate_tools(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    if len(tools) > settings.GATEWAY["MAX_TOOLS"]:
        raise invalid(f"Too many tools: at most {settings.GATEWAY['MAX_TOOLS']}.", "tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise invalid(f"'tools[{i}]' must be {{'type': 'function', 'function': {{...}}}}.", f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise invalid(
                f"Invalid 'tools[{i}].function.name': must match ^[a-zA-Z0-9_-]{{1,64}}$.",
                f"tools[{i}].function.name",
            )
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise invalid(f"'tools[{i}].function.parameters' must be an object.", f"tools[{i}].function.parameters")
        names.append(name)
    return names


def _validate_tool_choice(choice: Any, names: list[str]) -> None:
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise invalid("'tool_choice' is 'required' but no tools were given.", "tool_choice")
        return
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise invalid(f"'tool_choice' names the function {name!r}, which is not in 'tools'.", "tool_choice")
        return
    raise invalid("'tool_choice' must be 'none', 'auto', 'required' or a named function.", "tool_choice")


def _validate_params(data: dict) -> dict:
    params: dict[str, Any] = {}
    for name in PASSTHROUGH_PARAMS:
        if name in data and data[name] is not None:
            params[name] = data[name]
    for name, (low, high) in _RANGES.items():
        if name in params:
            value = params[name]
            if not _is_number(value) or not low <= value <= high:
                raise invalid(f"Invalid '{name}': must be a number between {low} and {high}.", name)
    if "n" in params and (not _is_int(params["n"]) or not 1 <= params["n"] <= 128):
        raise invalid("Invalid 'n': must be an integer between 1 and 128.", "n")
    if "seed" in params and not _is_int(params["seed"]):
        raise invalid("Invalid 'seed': must be an integer.", "seed")
    if "stop" in params:
        stop = params["stop"]
        if isinstance(stop, list):
            if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
                raise invalid("Invalid 'stop': at most 4 non-empty strings.", "stop")
        elif not isinstance(stop, str) or not stop:
            raise invalid("Invalid 'stop': a non-empty string or an array of at most 4.", "stop")
    if "response_format" in params:
        fmt = params["response_format"]
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid(
                "Invalid 'response_format.type': must be 'text', 'json_object' or 'json_schema'.",
                "response_format",
            )
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise invalid("'response_format.json_schema' is required for type json_schema.", "response_format.json_schema")
            if spec.get("strict") and "schema" in spec:
                validate_schema(spec["schema"])
    names = _validate_tools(params["tools"]) if "tools" in params else []
    if "tool_choice" in params:
        _validate_tool_choice(params["tool_choice"], names)
    if "user" in params and (not isinstance(params["user"], str) or len(params["user"]) > 256):
        raise invalid("Invalid 'user': a string of at most 256 characters.", "user")
    if "logprobs" in params and not isinstance(params["logprobs"], bool):
        raise invalid("Invalid 'logprobs': must be a boolean.", "logprobs")
    if "top_logprobs" in params and (not _is_int(params["top_logprobs"]) or not 0 <= params["top_logprobs"] <= 20):
        raise invalid("Invalid 'top_logprobs': an integer between 0 and 20.", "top_logprobs")
    return params


def _max_tokens(data: dict) -> int | None:
    value = None
    for name in ("max_tokens", "max_completion_tokens"):
        if data.get(name) is not None:
            if not _is_int(data[name]) or data[name] < 1:
                raise invalid(f"Invalid '{name}': must be a positive integer.", name)
            value = data[name]  # max_completion_tokens (the newer name) wins when both are sent
    return value


OVERFLOW_MODES = ("error", "trim_oldest")


def _overflow(data: dict, header: str | None) -> bool:
    """`context_overflow: "trim_oldest"` in the body (SDK: extra_body) or X-Context-Overflow."""
    mode = header or data.get("context_overflow") or "error"
    if mode not in OVERFLOW_MODES:
        raise invalid("Invalid 'context_overflow': 'error' (default) or 'trim_oldest'.", "context_overflow")
    return mode == "trim_oldest"


def validate_chat(data: dict, feature_header: str | None = None, overflow_header: str | None = None) -> ChatRequest:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("Missing required parameter: 'model'.", "model")
    messages = _validate_messages(data.get("messages"))
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("Invalid 'stream': must be a boolean.", "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("The 'stream_options' parameter is only allowed when 'stream' is true.", "stream_options")
        if not isinstance(options, dict):
            raise invalid("Invalid 'stream_options': must be an object.", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise invalid("Invalid 'metadata': an object of string values.", "metadata")
    feature = feature_header or (metadata or {}).get("feature")
    if feature is not None and not _FEATURE.match(feature):
        raise GatewayError(400, "Invalid feature tag: 1-64 characters of [A-Za-z0-9_.:/-].", param="metadata.feature")
    params = _validate_params(data)
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=_max_tokens(data),
        params=params,
        user=params.get("user"),
        feature=feature,
        metadata=metadata,
        trim_oldest=_overflow(data, overflow_header),
    )
