"""The wire format of lua/limits.lua: operations packed for a call, and the call's replies read.

The script's arguments and replies are documented at the top of lua/limits.lua; this module is
the only Python that knows them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from django.conf import settings

from billing.periods import current_periods
from llm_platform.resp import pack_args

from ..scripts import LuaFunction

if TYPE_CHECKING:
    from .policy import Scope, _Plan

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


def admit(plan: _Plan, request_id: str, tokens: int, estimate: int) -> Operation:
    """'a': admit one request of `tokens` and `estimate` nano-dollars."""
    return _operation((plan, ADMIT, _bulk3(request_id.encode(), b"%d" % tokens, b"%d" % estimate), 3))


def admit_with_lease(plan: _Plan, request_id: str, tokens: int, estimate: int, units: int, lease_id: str,
                     slots: int) -> Operation:
    """'L': admit one request, and take a lease of up to `units` more like it and `slots` slots."""
    values = _bulk3(request_id.encode(), b"%d" % tokens, b"%d" % estimate) + pack_args((units, lease_id, slots))
    return _operation((plan, ADMIT_LEASE, values, 6))


def lease(plan: _Plan, lease_id: str, tokens: int, estimate: int, units: int, slots: int) -> Operation:
    """'l': a lease alone, for requests of `tokens` and `estimate`."""
    return _operation((plan, LEASE, pack_args((lease_id, tokens, estimate, units, slots)), 5))


def settle(plan: _Plan, request_id: str, refund: int, delta: int) -> Operation:
    """'s': settle a request: `refund` tokens back (negative charges more), spend moved by `delta`."""
    return _operation((plan, SETTLE, _bulk3(request_id.encode(), b"%d" % refund, b"%d" % delta), 3))


def give_back(plan: _Plan, lease_id: str, slots: int, requests: int, tokens: int, nano: int) -> Operation:
    """'r': a lease given back: its `slots` members, and the requests, tokens, nano-dollars unused."""
    return _operation((plan, RETURN, pack_args((lease_id, slots, requests, tokens, nano)), 5))


class PackedPlan(NamedTuple):
    """A plan as calls carry it: its keys, and its arguments in full or by name."""

    keys: bytes
    n_keys: int
    name: str  # a digest of its keys and arguments: what the script knows it by
    full: bytes
    n_full: int
    short: bytes


def pack_plan(slot_ttl_ms: int, tenant_id: int, key_id: int, scopes: list[Scope]) -> PackedPlan:
    """A plan's part of a call (the layout at the top of lua/limits.lua)."""
    keys: list[str] = []
    spec: list = [slot_ttl_ms, tenant_id, key_id, len(scopes)]
    for scope in scopes:
        keys += (scope.hash_key, scope.slot_key)
        spec += (scope.label, len(scope.buckets), scope.slot_limit, len(scope.budgets), scope.ttl_ms)
        for bucket in scope.buckets:
            spec += (bucket.field, bucket.limit, repr(bucket.rate_per_ms), 1 if bucket.header == "tokens" else 0)
        for budget in scope.budgets:
            spec += (budget.field, budget.period, budget.limit)
    packed_keys, args = pack_args(keys), pack_args(spec)
    name = hashlib.sha1(packed_keys + args).hexdigest()[:20]
    return PackedPlan(packed_keys, len(keys), name, pack_args((name, len(spec))) + args, 2 + len(spec),
                      pack_args((name, 0)))


def tagged(reply: list) -> dict[str, object]:
    """One operation's reply (lua/limits.lua: a flat list of tag/value pairs) by tag."""
    it = iter(reply)
    return {tag.decode(): value for tag, value in zip(it, it, strict=True)}


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

