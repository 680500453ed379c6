"""The wire format of lua/limits.lua: operations packed for a call, and the call's replies read.

The script's arguments and replies are documented at the top of lua/limits.lua; this module is
the only Python that knows them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from django.conf import settings

from billing.periods import current_periods
from llm_platform.resp import pack_args

from ..scripts import LuaFunction
from .policy import _HeaderKind, reset_text

if TYPE_CHECKING:
    from .policy import _Plan

LIMITS = LuaFunction("limits.lua", "gw_limits")

class Operation(NamedTuple):
    """One operation of lua/limits.lua (`submit` sends it): its plan, its kind, and its own
    arguments after the kind and the plan's index (packed)."""

    plan: _Plan
    kind: int  # ADMIT, SETTLE, ADMIT_LEASE, RETURN or LEASE: odd kinds give back
    values: bytes
    n_values: int


ADMIT, SETTLE, ADMIT_LEASE, RETURN, LEASE = range(5)
_KIND_LETTERS = "asLrl"  # as the script names them


_operation = functools.partial(tuple.__new__, Operation)  # what Operation(...) does, without its Python-level __new__


def _bulk3(a: bytes, b: bytes, c: bytes) -> bytes:
    """Three RESP bulk strings (`pack_args` for the hot path's fixed shapes)."""
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(a), a, len(b), b, len(c), c)



def tagged(reply: list) -> dict[str, object]:
    """One operation's reply (lua/limits.lua: a flat list of tag/value pairs) by tag."""
    it = iter(reply)
    return {tag.decode(): value for tag, value in zip(it, it, strict=True)}


def _headers(header_kinds: list[_HeaderKind], reply: dict) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* from the tightest requests and tokens buckets (tenant or key), as the
    response carries them. `reply`: an admission's (`tagged`), each bucket's [remaining, reset
    ms] under its tag."""
    headers = []
    for limit_name, remaining_name, reset_name, tag, limit, others in header_kinds:
        remaining, reset = reply[tag]
        for other_tag, other_limit in others:  # a key with limits of its own: the tighter one
            other = reply[other_tag]
            if other[0] < remaining:
                limit, (remaining, reset) = other_limit, other
        headers += ((limit_name, limit), (remaining_name, b"%d" % remaining if remaining > 0 else b"0"),
                    (reset_name, reset_text(reset)))
    return headers


_Queued = tuple[Operation, asyncio.Future, Callable[[list], None] | None]
MAX_CALL_OPERATIONS = 64  # per script call: ~1-2 ms of Redis time at most, then other clients' turn
MAX_KNOWN_PLANS = 10_000  # the library's MAX_PLANS: past it, plans are spelled out again
_HEADS = [[b""] + [pack_args((kind, i)) for i in range(1, MAX_CALL_OPERATIONS + 1)]
          for kind in _KIND_LETTERS]  # [kind][plan index]: the kind and the plan's index, packed


def _call(batch: list[_Queued], known: set[str], spell_out: bool = False) -> bytes:
    """The FCALL of lua/limits.lua for these operations: each plan once (by name if it is in
    `known` and not `spell_out`; else in full, and added to it), then the operations."""
    if len(known) > MAX_KNOWN_PLANS:
        known.clear()
    index: dict[int, int] = {}
    keys, plans, operations = [], [], []
    n_keys, n_args = 1, 3
    heads = _HEADS
    for operation, _, _ in batch:
        plan = operation.plan
        i = index.get(id(plan))
        if i is None:
            i = index[id(plan)] = len(index) + 1
            keys.append(plan.keys)
            n_keys += plan.n_keys
            if not spell_out and plan.name in known:
                plans.append(plan.short)
                n_args += 2
            else:
                plans.append(plan.full)
                n_args += plan.n_full
                known.add(plan.name)
        operations.append(heads[operation.kind][i])  # a call has at most MAX_CALL_OPERATIONS plans
        operations.append(operation.values)
        n_args += 2 + operation.n_values
    keys.append(_alert_stream())
    (_, day_left), (_, month_left) = current_periods()
    return LIMITS.assemble(n_keys, keys, n_args,
                           [_bulk3(b"%d" % len(index), b"%d" % day_left, b"%d" % month_left), *plans, *operations])


_alert_packed: tuple[str, bytes] = ("", b"")


def _alert_stream() -> bytes:
    """The alert stream's name, packed (again only when the setting changes)."""
    global _alert_packed
    alert = settings.GATEWAY["ALERT_STREAM"]
    if _alert_packed[0] != alert:
        _alert_packed = (alert, pack_args((alert,)))
    return _alert_packed[1]


def _deliver(batch: list[_Queued], outcome) -> None:
    """Each operation's reply to its waiter (`tagged`), or the call's failure to every waiter."""
    failed = isinstance(outcome, BaseException)
    for i, (_, waiter, abandoned) in enumerate(batch):
        reply = None if failed or isinstance(outcome[i], Exception) else tagged(outcome[i])
        if waiter.done():  # its caller was cancelled
            if abandoned is not None and not failed:
                abandoned(outcome[i] if reply is None else reply)
            continue
        if failed:
            waiter.set_exception(type(outcome)(*outcome.args))
        elif reply is None:  # that operation's own error; the others went on
            waiter.set_exception(outcome[i])
        else:
            waiter.set_result(reply)

