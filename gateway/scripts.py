"""The Lua scripts of the hot path, run through the lean Redis client (llm_platform/resp.py).

Several prepared calls (admission and a lane check; settlement and lane reports) go out in one
write and come back in one round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from llm_platform.resp import Function, Script, get_resp, raise_errors

__all__ = ["LuaFunction", "LuaScript", "ScriptCall", "run_scripts"]

_LUA = Path(__file__).with_name("lua")


class LuaScript(Script):
    """A script from gateway/lua/, called by SHA (loaded again when Redis says NOSCRIPT)."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__((_LUA / name).read_text())

    def call(self, keys: list, args: list) -> ScriptCall:
        return ScriptCall(self, self.pack(keys, args))

    async def run(self, keys: list, args: list):
        return await get_resp().evalsha(self, keys, args)


class LuaFunction(Function):
    """A function library from gateway/lua/ (`#!lua name=<name>`), called with FCALL (loaded
    again when Redis says it has no such function)."""

    __slots__ = ()

    def __init__(self, file: str, name: str) -> None:
        super().__init__((_LUA / file).read_text(), name)


class ScriptCall(NamedTuple):
    """One prepared script invocation, packed (`LuaScript.call`)."""

    script: Script
    data: bytes


async def run_scripts(calls: list[ScriptCall], defer: bool = False) -> list:
    """Run prepared scripts in one round trip; results in order. Raises on any Redis failure.

    `defer` lets the write wait a moment (GW_REDIS_DEFER_MS) to go out with the next request's:
    for work no client waits on."""
    if not calls:
        return []
    return raise_errors(await get_resp().evalsha_packed(calls, defer))
