"""Anthropic's Messages API requests in the platform's normalized chat vocabulary (pure).

`parse_request` turns a `/v1/messages` body into a `ChatRequest` whose messages use OpenAI
Chat's vocabulary (what every lane understands), and keeps the body itself as `native`, so that
an Anthropic lane forwards it unchanged (thinking, cache_control, top_k and the rest). Bad input
is a 400 naming the field, worded as Anthropic words it. The answers go back through
anthropic_render.py; the door (anthropic_messages.py) wires both to the chat session.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from django.conf import settings

from ..errors import GatewayError
from ..types import ChatRequest

PROTOCOL = "anthropic"
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
TOOL_CHOICES = ("auto", "any", "tool", "none")
THINKING_TYPES = ("enabled", "disabled", "adaptive")


# -- request ---------------------------------------------------------------------------------


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(block: dict, name: str, param: str) -> str:
    value = block.get(name)
    if not isinstance(value, str):
        raise invalid(f"{param}.{name}: Input should be a valid string", f"{param}.{name}")
    return value


def _block_type(block: Any, param: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise invalid(f"{param}: Input should be an object with a 'type'", param)
    return block["type"]


def _image_part(block: dict, param: str) -> dict:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = _string(source, "media_type", f"{param}.source"), _string(source, "data", f"{param}.source")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": _string(source, "url", f"{param}.source")}}
    raise invalid(f"{param}.source: image sources must be of type 'base64' or 'url'", f"{param}.source")


def _document_part(block: dict, param: str) -> dict:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = _string(source, "media_type", f"{param}.source"), _string(source, "data", f"{param}.source")
        file: dict[str, Any] = {"file_data": f"data:{media_type};base64,{data}"}
        if isinstance(block.get("title"), str):
            file["filename"] = block["title"]
        return {"type": "file", "file": file}
    if kind == "text":
        return {"type": "text", "text": _string(source, "data", f"{param}.source")}
    raise invalid(f"{param}.source: document sources must be of type 'base64' or 'text'", f"{param}.source")


def _tool_result(block: dict, param: str) -> tuple[dict, list[dict]]:
    """A tool_result block as an OpenAI `tool` message, and any images it carried (OpenAI's
    tool messages hold text only; the images follow in a user message)."""
    tool_use_id = _string(block, "tool_use_id", param)
    content = block.get("content")
    images: list[dict] = []
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            kind = _block_type(part, f"{param}.content.{k}")
            if kind == "text":
                texts.append(_string(part, "text", f"{param}.content.{k}"))
            elif kind == "image":
                images.append(_image_part(part, f"{param}.content.{k}"))
            else:
                raise invalid(f"{param}.content.{k}.type: tool results may hold 'text' and 'image' blocks",
                              f"{param}.content.{k}.type")
        text = "\n".join(texts)
    else:
        raise invalid(f"{param}.content: Input should be a string or a list of blocks", f"{param}.content")
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images


def _user(content: Any, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict] = []
    parts: list[dict] = []
    for j, block in enumerate(content):
        p = f"{param}.{j}"
        kind = _block_type(block, p)
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", p)})
        elif kind == "image":
            parts.append(_image_part(block, p))
        elif kind == "document":
            parts.append(_document_part(block, p))
        elif kind == "tool_result":
            message, images = _tool_result(block, p)
            results.append(message)
            parts.extend(images)
        else:
            raise invalid(f"{p}.type: blocks of type '{kind}' are not accepted in a user message", f"{p}.type")
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            results.append({"role": "user", "content": parts[0]["text"]})
        else:
            results.append({"role": "user", "content": parts})
    return results


def _assistant(content: Any, param: str) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict] = []
    for j, block in enumerate(content):
        p = f"{param}.{j}"
        kind = _block_type(block, p)
        if kind == "text":
            texts.append(_string(block, "text", p))
        elif kind == "tool_use":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise invalid(f"{p}.input: Input should be an object", f"{p}.input")
            calls.append({"id": _string(block, "id", p), "type": "function",
                          "function": {"name": _string(block, "name", p), "arguments": orjson.dumps(arguments).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # an Anthropic lane gets them in the native body; other lanes have no word for them
        else:
            raise invalid(f"{p}.type: blocks of type '{kind}' are not accepted in an assistant message", f"{p}.type")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(value: Any) -> list[dict]:
    if value is None:
        raise invalid("messages: Field required", "messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages: Input should be a non-empty list", "messages")
    if len(value) > settings.GATEWAY["MAX_MESSAGES"]:
        raise invalid(f"messages: too many messages ({len(value)} > {settings.GATEWAY['MAX_MESSAGES']})", "messages")
    out: list[dict] = []
    for i, message in enumerate(value):
        param = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise invalid(f"{param}.role: Input should be 'user' or 'assistant'", f"{param}.role")
        content = message.get("content")
        if not isinstance(content, (str, list)) or (isinstance(content, list) and not content):
            raise invalid(f"{param}.content: Input should be a string or a non-empty list of blocks", f"{param}.content")
        if role == "user":
            out.extend(_user(content, f"{param}.content"))
        else:
            out.append(_assistant(content, f"{param}.content"))
    return out


def _system(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if not isinstance(value, list):
        raise invalid("system: Input should be a string or a list of text blocks", "system")
    texts = []
    for j, block in enumerate(value):
        if _block_type(block, f"system.{j}") != "text":
            raise invalid(f"system.{j}.type: only 'text' blocks are accepted in system", f"system.{j}.type")
        texts.append(_string(block, "text", f"system.{j}"))
    return "\n\n".join(t for t in texts if t) or None


def _tools(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise invalid("tools: Input should be a list", "tools")
    if len(value) > settings.GATEWAY["MAX_TOOLS"]:
        raise invalid(f"tools: at most {settings.GATEWAY['MAX_TOOLS']} tools", "tools")
    out = []
    for i, tool in enumerate(value):
        param = f"tools.{i}"
        if not isinstance(tool, dict):
            raise invalid(f"{param}: Input should be an object", param)
        if tool.get("type", "custom") not in ("custom", None):
            raise invalid(f"{param}.type: server tools ('{tool.get('type')}') are not supported by this platform; "
                          "declare client tools with name, description and input_schema", f"{param}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise invalid(f"{param}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'", f"{param}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise invalid(f"{param}.input_schema: Field required (an object)", f"{param}.input_schema")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str) and tool["description"]:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, names: list[str], params: dict) -> None:
    if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICES:
        raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'", "tool_choice")
    kind = choice["type"]
    if not names:  # OpenAI-compatible servers refuse a tool_choice without tools
        if kind in ("auto", "none"):
            return
        raise invalid(f"tool_choice: '{kind}' needs 'tools'", "tool_choice")
    if kind == "tool":
        if choice.get("name") not in names:
            raise invalid(f"tool_choice.name: {choice.get('name')!r} is not one of the tools", "tool_choice.name")
        params["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        params["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        params["parallel_tool_calls"] = False


def _sampling(data: dict, params: dict) -> None:
    for name in ("temperature", "top_p"):
        value = data.get(name)
        if value is not None:
            if not _is_number(value) or not 0 <= value <= 1:
                raise invalid(f"{name}: Input should be a number between 0 and 1", name)
            params[name] = value
    top_k = data.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):  # Anthropic lanes only (native body)
        raise invalid("top_k: Input should be a non-negative integer", "top_k")
    stops = data.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid("stop_sequences: Input should be a list of non-empty strings", "stop_sequences")
        if stops:
            params["stop"] = list(stops)


def _thinking(value: Any, max_tokens: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") not in THINKING_TYPES:
        raise invalid("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'", "thinking.type")
    if value["type"] == "enabled":
        budget = value.get("budget_tokens")
        if not _is_int(budget) or budget < 1024:
            raise invalid("thinking.budget_tokens: Input should be an integer of at least 1024", "thinking.budget_tokens")
        if max_tokens is not None and budget >= max_tokens:
            raise invalid("thinking.budget_tokens: must be less than max_tokens", "thinking.budget_tokens")


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid("metadata: Input should be an object", "metadata")
    user = metadata.get("user_id")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise invalid("metadata.user_id: a string of at most 256 characters", "metadata.user_id")
    return user or None


def parse_request(data: dict, feature: str | None = None, *, need_max_tokens: bool = True) -> ChatRequest:
    """A `/v1/messages` (or count_tokens) body as the normalized request; 400 on bad input."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required", "model")
    max_tokens = data.get("max_tokens")
    if max_tokens is None and need_max_tokens:
        raise invalid("max_tokens: Field required", "max_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise invalid("max_tokens: Input should be an integer greater than or equal to 1", "max_tokens")
    messages = _messages(data.get("messages"))
    system = _system(data.get("system"))
    if system:
        messages.insert(0, {"role": "system", "content": system})
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream: Input should be a valid boolean", "stream")
    params: dict[str, Any] = {}
    _sampling(data, params)
    names: list[str] = []
    if data.get("tools") is not None:
        params["tools"] = _tools(data["tools"])
        names = [tool["function"]["name"] for tool in params["tools"]]
        if not params["tools"]:
            del params["tools"]
    if data.get("tool_choice") is not None:
        _tool_choice(data["tool_choice"], names, params)
    _thinking(data.get("thinking"), max_tokens)
    if data.get("cache_control") is not None and not isinstance(data["cache_control"], dict):
        raise invalid("cache_control: Input should be an object", "cache_control")
    user = _user_id(data.get("metadata"))
    if user is not None:
        params["user"] = user
    if feature is not None and not _FEATURE.match(feature):
        raise invalid("Invalid feature tag: 1-64 characters of [A-Za-z0-9_.:/-].", "x-feature")
    return ChatRequest(model=model, messages=messages, stream=bool(stream), include_usage=bool(stream),
                       max_tokens=max_tokens, params=params, user=user, feature=feature,
                       native=(PROTOCOL, data))
