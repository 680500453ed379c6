"""The Lua scripts of the hot path, run through the lean Redis client (llm_platform/resp.py).

Several prepared calls (admission and a lane check; settlement and lane reports) go out in one
write and come back in one round trip.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

from llm_platform.resp import Function, ResponseError, Script, get_resp, raise_errors

__all__ = ["LuaFunction", "LuaScript", "ScriptCall", "prune_functions", "run_scripts"]
log = logging.getLogger(__name__)

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


FUNCTIONS_IN_USE = "gw:functions"  # hash: library name -> ms at which a process last said it uses it


async def prune_functions(in_use: list[LuaFunction], idle_s: float) -> list[str]:
    """Say that this process uses `in_use`, and delete versions of our libraries that no process
    has said so of for `idle_s`: each deploy loads a library under a new name (its source's
    hash), and Redis would otherwise keep every old one, with the plans it holds, for ever.

    Libraries are global to a Redis server, the marks are per database: a library this
    database's processes never named (another deployment's, on another database of the same
    Redis) is left alone; that deployment's own processes prune it. A process of an old version
    still running when its library goes just loads it again (a missing function is loaded on
    demand). Returns the names deleted."""
    client = get_resp()
    now_ms = int(time.time() * 1000)
    (_, listed, marks) = await client.execute_many([
        ("HSET", FUNCTIONS_IN_USE, *[part for function in in_use for part in (function.name, now_ms)]),
        ("FUNCTION", "LIST"),
        ("HGETALL", FUNCTIONS_IN_USE),
    ])
    raise_errors([listed, marks])
    loaded = {_library_name(entry) for entry in listed}
    seen = {name.decode(): int(at) for name, at in zip(marks[::2], marks[1::2], strict=True)}
    stale = sorted(name for name in loaded & seen.keys() if now_ms - seen[name] > idle_s * 1000)
    gone = sorted(seen.keys() - loaded)  # deleted by someone else, or a flushed Redis
    commands: list[tuple] = [("FUNCTION", "DELETE", name) for name in stale]
    if stale or gone:
        commands.append(("HDEL", FUNCTIONS_IN_USE, *stale, *gone))
    if commands:
        for reply in await client.execute_many(commands):
            if isinstance(reply, ResponseError) and "library not found" not in str(reply).lower():
                raise reply
    if stale:
        log.info("deleted Redis function libraries no process has used lately", extra={"libraries": stale})
    return stale


def _library_name(entry: list) -> str:
    fields = dict(zip(entry[::2], entry[1::2], strict=False))
    return fields[b"library_name"].decode()
