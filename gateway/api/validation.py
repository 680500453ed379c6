"""Validate a chat request body at the boundary, in microseconds, into a ChatRequest.

Every failure is a 400 naming the offending parameter, raised before any provider call or
charge. Unknown top-level fields are ignored (not forwarded), as OpenAI-compatible servers do.

Whatever passes has the types the rest of the platform relies on (token counting, the
idempotency fingerprint, the provider adapters): a string where a string is read, an object
where keys are looked up, and no value nested deeper than nesting.MAX_DEPTH, so no input can
make them raise.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from django.conf import settings

from ..errors import GatewayError, invalid
from ..structured import validate_schema
from ..types import PASSTHROUGH_PARAMS, ChatRequest
from .nesting import nests_too_deep, too_deep_error

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
LEADING_ROLES = frozenset({"system", "developer"})
EMPTY_REFUSED = frozenset({"user", "system", "developer"})  # an empty string content is refused
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


def _str(value: Any) -> bool:
    return isinstance(value, str)


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (validate_chat bounds its nesting)."""
    if not body:
        raise invalid("The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)  # refuses nesting past 1024 levels itself
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
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"Invalid content part at '{where}': must be an object with a 'type'.", where)
        kind = part.get("type")
        if not _str(kind) or kind not in PART_TYPES:
            raise invalid(
                f"Invalid content part at '{where}': 'type' must be one of {', '.join(sorted(PART_TYPES))}.",
                f"{where}.type",
            )
        text = part.get("text")
        if kind == "text" or text is not None:  # token counting reads any part's text
            if not _str(text):
                raise invalid(f"'{where}.text' must be a string.", f"{where}.text")
            total += len(text)
        if kind != "text":
            _check_part(part, kind, where)
    return total


def _check_part(part: dict, kind: str, where: str) -> None:
    """The non-text parts' own objects, as OpenAI's API types them."""
    if kind == "refusal":
        if not _str(part.get("refusal")):
            raise invalid(f"'{where}.refusal' must be a string.", f"{where}.refusal")
        return
    value = part.get(kind)
    if kind == "image_url" and _str(value):
        return  # a bare URL string: accepted, as the Anthropic mapping does
    if not isinstance(value, dict):
        raise invalid(f"'{where}.{kind}' must be an object.", f"{where}.{kind}")
    required = {"image_url": ("url",), "input_audio": ("data", "format"), "file": ()}[kind]
    for name in required:
        if not _str(value.get(name)):
            raise invalid(f"'{where}.{kind}.{name}' must be a string.", f"{where}.{kind}.{name}")
    for name, field in value.items():
        if field is not None and not _str(field):
            raise invalid(f"'{where}.{kind}.{name}' must be a string.", f"{where}.{kind}.{name}")


def _validate_messages(messages: Any) -> list[dict]:
    """The messages, checked; those with more than a role and a string content (which may hold
    nested values) are listed for the nesting check."""
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
    rich = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"'messages[{i}]' must be an object.", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(
                f"Invalid value for 'messages[{i}].role': {_shown(role)}. Supported roles are "
                "'system', 'developer', 'user', 'assistant' and 'tool'.",
                f"messages[{i}].role",
            )
        if role in LEADING_ROLES:
            if seen_other:
                raise invalid(
                    f"'messages[{i}]': a {role} message may only come first, before other messages.",
                    f"messages[{i}].role",
                )
        else:
            seen_other = True
            if role == "user":
                seen_user = True
        content = message.get("content")
        if type(content) is str:  # the common case, kept short: the hot path validates every message
            if not content and role in EMPTY_REFUSED:
                raise invalid(f"'messages[{i}].content' must not be empty.", f"messages[{i}].content")
            chars += len(content)
        elif content is not None:
            chars += _content_length(content, f"messages[{i}].content")
        elif role != "assistant":
            raise invalid(f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content")
        elif not message.get("tool_calls") and not message.get("function_call"):
            raise invalid(
                f"'messages[{i}].content' is required unless the assistant message has tool_calls.",
                f"messages[{i}].content",
            )
        if len(message) != 2 or type(content) is not str or role == "tool":
            _check_fields(message, role, f"messages[{i}]")
            rich.append(message)
    if not seen_user:
        raise invalid("'messages' must contain at least one user message.", "messages")
    if chars > limits["MAX_CONTENT_CHARS"]:
        raise invalid(
            f"The messages are too long: {chars} characters > {limits['MAX_CONTENT_CHARS']}.",
            "messages",
        )
    return rich


def _check_fields(message: dict, role: str, param: str) -> None:
    """A message's fields beyond its role and content."""
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"Invalid type for '{param}.name': expected a string.", f"{param}.name")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise invalid(f"Missing required parameter: '{param}.tool_call_id'.", f"{param}.tool_call_id")
    if message.get("tool_calls") is not None:
        if role != "assistant":
            raise invalid(f"'{param}.tool_calls' is only allowed on assistant messages.", f"{param}.tool_calls")
        _validate_tool_calls(message["tool_calls"], f"{param}.tool_calls")
    if message.get("function_call") is not None:
        if role != "assistant":
            raise invalid(f"'{param}.function_call' is only allowed on assistant messages.", f"{param}.function_call")
        _validate_function(message["function_call"], f"{param}.function_call")


def _shown(value: Any) -> str:
    """A client's value quoted in an error message, kept short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _validate_function(function: Any, param: str) -> None:
    """A tool call's (or the legacy function_call's) function: a name and string arguments."""
    if not isinstance(function, dict):
        raise invalid(f"'{param}' must be an object with a 'name'.", param)
    if not _str(function.get("name")):
        raise invalid(f"'{param}.name' is required and must be a string.", f"{param}.name")
    if "arguments" in function and not _str(function["arguments"]):
        raise invalid(f"Invalid type for '{param}.arguments': expected a string of JSON.", f"{param}.arguments")


def _validate_tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise invalid(f"'{param}' must be an array.", param)
    for k, call in enumerate(calls):
        where = f"{param}[{k}]"
        if not isinstance(call, dict):
            raise invalid(f"'{where}' must be an object.", where)
        if call.get("id") is not None and not _str(call["id"]):
            raise invalid(f"Invalid type for '{where}.id': expected a string.", f"{where}.id")
        if call.get("type", "function") != "function":
            raise invalid(f"Invalid value for '{where}.type': only 'function' is supported.", f"{where}.type")
        _validate_function(call.get("function"), f"{where}.function")


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
        if not _str(name) or not _TOOL_NAME.match(name):
            raise invalid(
                f"Invalid 'tools[{i}].function.name': must match ^[a-zA-Z0-9_-]{{1,64}}$.",
                f"tools[{i}].function.name",
            )
        if function.get("description") is not None and not _str(function["description"]):
            raise invalid(f"Invalid type for 'tools[{i}].function.description': expected a string.",
                          f"tools[{i}].function.description")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise invalid(f"'tools[{i}].function.parameters' must be an object.", f"tools[{i}].function.parameters")
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise invalid(f"Invalid type for 'tools[{i}].function.strict': expected a boolean.",
                          f"tools[{i}].function.strict")
        names.append(name)
    return names


def _validate_tool_choice(choice: Any, names: list[str]) -> None:
    if _str(choice) and choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise invalid("'tool_choice' is 'required' but no tools were given.", "tool_choice")
        return
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if not isinstance(function, dict) or not _str(function.get("name")):
            raise invalid("'tool_choice.function' must be an object with the function's 'name'.", "tool_choice.function")
        if function["name"] not in names:
            raise invalid(f"'tool_choice' names the function {_shown(function['name'])}, which is not in 'tools'.",
                          "tool_choice")
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
            _validate_json_schema(fmt.get("json_schema"))
    names = _validate_tools(params["tools"]) if "tools" in params else []
    if "tool_choice" in params:
        _validate_tool_choice(params["tool_choice"], names)
    # No NUL: PostgreSQL cannot store it, so the call's usage row could not be written.
    if "user" in params and (not _str(params["user"]) or len(params["user"]) > 256 or "\x00" in params["user"]):
        raise invalid("Invalid 'user': a string of at most 256 characters, without NUL.", "user")
    if "logprobs" in params and not isinstance(params["logprobs"], bool):
        raise invalid("Invalid 'logprobs': must be a boolean.", "logprobs")
    if "top_logprobs" in params and (not _is_int(params["top_logprobs"]) or not 0 <= params["top_logprobs"] <= 20):
        raise invalid("Invalid 'top_logprobs': an integer between 0 and 20.", "top_logprobs")
    if "parallel_tool_calls" in params and not isinstance(params["parallel_tool_calls"], bool):
        raise invalid("Invalid 'parallel_tool_calls': must be a boolean.", "parallel_tool_calls")
    if "reasoning_effort" in params and not _str(params["reasoning_effort"]):
        raise invalid("Invalid 'reasoning_effort': must be a string such as 'low', 'medium' or 'high'.",
                      "reasoning_effort")
    if "logit_bias" in params:
        bias = params["logit_bias"]
        if not isinstance(bias, dict) or not all(_is_number(v) and -100 <= v <= 100 for v in bias.values()):
            raise invalid("Invalid 'logit_bias': an object of token ids to numbers between -100 and 100.", "logit_bias")
    return params


def _validate_json_schema(spec: Any) -> None:
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise invalid(f"'{param}' is required for type json_schema.", param)
    if spec.get("name") is not None and not _str(spec["name"]):
        raise invalid(f"Invalid type for '{param}.name': expected a string.", f"{param}.name")
    if spec.get("description") is not None and not _str(spec["description"]):
        raise invalid(f"Invalid type for '{param}.description': expected a string.", f"{param}.description")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"Invalid type for '{param}.strict': expected a boolean.", f"{param}.strict")
    if "schema" in spec and not isinstance(spec["schema"], dict):
        raise invalid(f"Invalid type for '{param}.schema': expected an object.", f"{param}.schema")
    if strict and "schema" in spec:
        validate_schema(spec["schema"])


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
    messages = data.get("messages")
    rich = _validate_messages(messages)
    if nests_too_deep(data, rich):  # before anything reads the rest (a schema check recurses)
        raise too_deep_error(data)
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
        include_usage = options.get("include_usage", False)
        if include_usage is None:
            include_usage = False
        if not isinstance(include_usage, bool):
            raise invalid("Invalid 'stream_options.include_usage': must be a boolean.", "stream_options.include_usage")
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
