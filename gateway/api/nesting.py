"""How deep a request body may nest, checked cheaply, and the param that names a too-deep value.

orjson cannot write past 254 levels (the idempotency fingerprint, token counting of tools, the
upstream request body) and jsonschema recurses once per level, so a body nested ~300 deep
answered 500. Every front door bounds its body with `nests_too_deep` before anything serializes
or walks it.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError, invalid

# JSON nesting allowed in a body (the body itself is level 1): a tool's parameters schema may
# still nest ~30 schema levels. orjson writes at most 254; OpenAI's strict schemas allow 10.
MAX_DEPTH = 64
# Where the body's shape is the gateway's, the path to a too-deep value names the field inside
# it; anything else (a schema, a part's extras, an unknown field) is named where it starts.
_SHAPE: dict = {
    "messages": {"[]": {"content": {"[]": {}}, "tool_calls": {"[]": {"function": {}}}, "function_call": {}}},
    "tools": {"[]": {"function": {"parameters": None}}},
    "response_format": {"json_schema": {"schema": None}},
    "tool_choice": {"function": {}},
}


def _too_deep(values: Any, level: int) -> bool:
    """Whether any container among `values` (at nesting `level`, the body being 1) or inside
    them goes past MAX_DEPTH. Iterative: a 1,000-level body cannot exhaust the stack."""
    stack = [(values, level)]
    while stack:
        values, level = stack.pop()
        for child in values:
            if isinstance(child, dict):
                if level > MAX_DEPTH:
                    return True
                stack.append((child.values(), level + 1))
            elif isinstance(child, list):
                if level > MAX_DEPTH:
                    return True
                stack.append((child, level + 1))
    return False


def nests_too_deep(data: dict, rich_messages: list[dict]) -> bool:
    """Whether the body nests past MAX_DEPTH. `rich_messages` are the message objects of
    `data["messages"]` that may hold containers (a message with just a role and a string content
    holds none; pass them all if unsure); the other top-level values are checked whole.
    First a bound at C speed: they cannot nest deeper than they have brackets in their JSON."""
    others = [value for key, value in data.items() if key != "messages" and isinstance(value, (dict, list))]
    if not rich_messages and not others:
        return False
    try:
        text = orjson.dumps((rich_messages, others))
    except orjson.JSONEncodeError:  # past 254 levels: the walk below finds where
        text = None
    # A message is at level 3 (the body is 1, messages 2), a top-level value at 2; 3 wrappers.
    if text is not None and 2 + text.count(b"{") + text.count(b"[") - 3 <= MAX_DEPTH:
        return False
    return (any(_too_deep(message.values(), 4) for message in rich_messages)
            or _too_deep(others, 2))


def too_deep_error(data: dict) -> GatewayError:
    param = _deep_param(data)
    return invalid(f"Invalid '{param}': nested more than {MAX_DEPTH} levels deep.", param)


def _deep_param(data: dict) -> str:
    """The param naming the first too-deep value: its path, cut where the gateway's shape ends."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    path: tuple = ()
    while stack:
        node, depth, where = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        found = next(((where + (key,)) for key, child in items
                      if isinstance(child, (dict, list)) and depth >= MAX_DEPTH), None)
        if found is not None:
            path = found
            break
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((child, depth + 1, where + (key,)) for key, child in items if isinstance(child, (dict, list)))
    param, shape = "", _SHAPE
    for key in path:
        param += f"[{key}]" if isinstance(key, int) else (f".{key}" if param else str(key))
        shape = shape.get("[]" if isinstance(key, int) else key, False) if isinstance(shape, dict) else None
        if not isinstance(shape, dict):
            break
    return param
