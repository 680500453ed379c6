"""OpenAI Responses API <-> the chat core's vocabulary: pure functions, no I/O.

    body, turn = to_chat_body(data, history)     # a Responses request -> a chat completions body
    items = output_items(text, tool_calls)       # an answer -> Responses output items
    obj = response_object(...)                   # the Response object
    renderer = StreamRenderer(...)               # session events -> typed SSE events
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..errors import GatewayError, invalid

ROLES = frozenset({"user", "assistant", "system", "developer"})
FORMATS = frozenset({"text", "json_schema", "json_object"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(part: Any, param: str) -> dict:
    if not isinstance(part, dict):
        raise invalid(f"Invalid '{param}': expected an object.", param)
    kind = part.get("type")
    if not isinstance(kind, str):
        raise invalid(f"Invalid '{param}.type': expected a string.", f"{param}.type")
    if kind in ("input_text", "output_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"Invalid '{param}.text': expected a string.", f"{param}.text")
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise invalid(f"Invalid '{param}.image_url': expected a URL or a data URL.", f"{param}.image_url")
        image = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise invalid(f"Invalid '{param}.type': '{kind}' is not supported here (input_text, output_text, input_image).",
                  f"{param}.type")


def _message(item: dict, param: str) -> dict:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(f"Invalid '{param}.role': expected one of user, assistant, system, developer.", f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise invalid(f"Invalid '{param}.content': expected a string or an array of content parts.", f"{param}.content")
    parts = [_text_part(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    if role != "user":  # only a user turn may carry images
        if any(p["type"] != "text" for p in parts):
            raise invalid(f"Invalid '{param}.content': only text parts are allowed for role '{role}'.", f"{param}.content")
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def input_messages(value: Any) -> tuple[list[dict], list[dict]]:
    """(the turn's messages in the normalized vocabulary, its input items as stored)."""
    if isinstance(value, str):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        return [{"role": "user", "content": value}], [item]
    if not isinstance(value, list) or not value:
        raise invalid("Invalid 'input': expected a string or a non-empty array of input items.", "input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"Invalid '{param}': expected an object.", param)
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise invalid(f"Invalid '{param}.type': expected a string.", f"{param}.type")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"Missing '{param}.call_id'.", f"{param}.call_id")
            if not isinstance(output, str):
                raise invalid(f"Invalid '{param}.output': expected a string.", f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            raise invalid(f"Invalid '{param}.type': '{kind}' is not supported "
                          "(message, function_call, function_call_output).", f"{param}.type")
    return messages, [dict(item, type=item.get("type", "message")) for item in value]


def _function_call(item: dict, param: str) -> dict:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise invalid(f"Invalid '{param}.{name}': expected a string.", f"{param}.{name}")
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}


def _tools(value: Any) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid("Invalid 'tools': expected an array.", "tools")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"Invalid 'tools[{i}].type': only function tools are supported.", f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise invalid("Invalid 'tool_choice': expected auto, none, required or {type: function, name}.", "tool_choice")


def _response_format(text: Any) -> dict | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str) or fmt["type"] not in FORMATS:
        raise invalid("Invalid 'text.format.type': expected text, json_schema or json_object.", "text.format.type")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


PASSED_ON = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata")


def to_chat_body(data: dict, history: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """(a chat completions body, the turn's normalized messages, its input items as stored)."""
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("Invalid 'instructions': expected a string.", "instructions")
    turn, items = input_messages(data.get("input"))
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + history + turn
    body: dict[str, Any] = {"model": data.get("model"), "messages": messages}
    for name in PASSED_ON:
        if data.get(name) is not None:
            body[name] = data[name]
    if data.get("max_output_tokens") is not None:
        body["max_tokens"] = data["max_output_tokens"]
    tools = _tools(data.get("tools"))
    if tools:
        body["tools"] = tools
    choice = _tool_choice(data.get("tool_choice"))
    if choice is not None and tools:
        body["tool_choice"] = choice
    fmt = _response_format(data.get("text"))
    if fmt is not None:
        body["response_format"] = fmt
    if data.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body, turn, items


# -- rendering ---------------------------------------------------------------------------------

def usage_object(usage) -> dict | None:
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.cache_creation_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" or text else []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(text: str | None, tool_calls: list[dict] | None) -> list[dict]:
    items = [message_item(new_id("msg"), text)] if text else []
    for call in tool_calls or ():
        items.append(call_item(new_id("fc"), call.get("id") or new_id("call"), call.get("name") or "",
                               call.get("arguments") or ""))
    return items


def assistant_messages(items: list[dict]) -> list[dict]:
    """The output items as normalized messages (kept in the conversation for follow-ups)."""
    text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message] if text or calls else []


def _error_code(error: GatewayError) -> str:
    """The Response object's error codes are a closed set: the nearest one (the platform's own
    code is in the message's error event and the usage row)."""
    if error.status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if 400 <= error.status < 500 else "server_error"


def response_object(response_id: str, created_at: float, data: dict, output: list[dict], usage, status: str,
                    finish_reason: str | None = None, error: GatewayError | None = None) -> dict:
    incomplete = None
    if status == "completed" and finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    fmt = (data.get("text") or {}).get("format") if isinstance(data.get("text"), dict) else None
    return {
        "id": response_id, "object": "response", "created_at": int(created_at), "status": status,
        "error": None if error is None else {"code": _error_code(error), "message": error.message},
        "incomplete_details": incomplete, "instructions": data.get("instructions"),
        "max_output_tokens": data.get("max_output_tokens"), "model": data.get("model"), "output": output,
        "parallel_tool_calls": data.get("parallel_tool_calls", True),
        "previous_response_id": data.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "store": data.get("store", True),
        "temperature": data.get("temperature"), "text": {"format": fmt or {"type": "text"}},
        "tool_choice": data.get("tool_choice", "auto"), "tools": data.get("tools") or [],
        "top_p": data.get("top_p"), "truncation": "disabled", "metadata": data.get("metadata") or {},
        **({"usage": usage_object(usage)} if usage is not None else {}),
        **({"user": data["user"]} if isinstance(data.get("user"), str) else {}),
    }


class StreamRenderer:
    """The session's stream events as Responses API typed events (`(type, payload)` pairs)."""

    def __init__(self, response_id: str, data: dict) -> None:
        self.id, self.data, self.created = response_id, data, time.time()
        self.seq = 0
        self.output: list[dict] = []
        self._text_item: dict | None = None  # the open message item
        self._text: list[str] = []
        self._calls: dict[int, dict] = {}  # tool-call index -> its open item
        self.usage = None
        self.finish_reason: str | None = None

    def _event(self, kind: str, **payload) -> tuple[str, dict]:
        event = {"type": kind, "sequence_number": self.seq, **payload}
        self.seq += 1
        return kind, event

    def response(self, status: str, error: GatewayError | None = None) -> dict:
        output = [dict(item) for item in self.output]  # a snapshot: the items change as the stream goes
        return response_object(self.id, self.created, self.data, output, self.usage, status, self.finish_reason, error)

    def started(self) -> list:
        snapshot = self.response("in_progress")
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def delta(self, chunk) -> list:
        events = []
        if chunk.usage_only:
            self.usage = chunk.usage
            return events
        for choice in chunk.choices():
            if choice.index != 0:
                continue
            if choice.text:
                if self._text_item is None:
                    self._text_item = message_item(new_id("msg"), "", "in_progress")
                    self.output.append(self._text_item)
                    index = len(self.output) - 1
                    events.append(self._event("response.output_item.added", output_index=index, item=self._text_item))
                    events.append(self._event("response.content_part.added", item_id=self._text_item["id"],
                                              output_index=index, content_index=0,
                                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
                self._text.append(choice.text)
                events.append(self._event("response.output_text.delta", item_id=self._text_item["id"],
                                          output_index=self.output.index(self._text_item), content_index=0,
                                          delta=choice.text, logprobs=[]))
            for call in choice.tool_calls or ():
                item = self._calls.get(call["index"])
                if item is None:
                    item = call_item(new_id("fc"), call.get("id") or new_id("call"), call.get("name") or "", "",
                                     "in_progress")
                    self._calls[call["index"]] = item
                    self.output.append(item)
                    events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                              item=dict(item)))
                if call.get("arguments"):
                    item["arguments"] += call["arguments"]
                    events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                              output_index=self.output.index(item), delta=call["arguments"]))
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        return events

    def _close_items(self) -> list:
        events = []
        for index, item in enumerate(self.output):
            if item["status"] != "in_progress":
                continue
            if item["type"] == "message":
                text = "".join(self._text)
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                events.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                          content_index=0, text=text, logprobs=[]))
                events.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                          content_index=0, part=part))
                item.update(content=[part], status="completed")
            else:
                events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                          output_index=index, name=item["name"], arguments=item["arguments"]))
                item["status"] = "completed"
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def finished(self, usage) -> list:
        self.usage = usage or self.usage
        closing = self._close_items()
        response = self.response("completed")
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return closing + [self._event(kind, response=response)]

    def failed(self, error: GatewayError) -> list:
        return [self._event("response.failed", response=self.response("failed", error))]
