"""Per-tenant and per-key limits, enforced atomically in Redis for every process at once.

Admission checks, then reserves: token buckets for requests/min, requests/hour and tokens/min
(bursts up to the bucket, the average enforced), concurrency slots (a sorted set of request ids
scored by expiry, so a dead worker's slot frees itself), and daily/monthly spend. Settlement
refunds unused reserved tokens (or charges an overshoot), releases the slot, settles spend from
the real cost, raises 80%/100% budget alerts once per period and buffers the usage row.

Both are operations of one Redis Function, lua/limits.lua, which runs any number of them
atomically. It keeps each principal's limits (a plan) parsed between calls: a call sends a plan
in full once, then only its name (again in full if Redis says NOPLAN).
The operations a process issues during one event-loop iteration go to Redis as one call of it
(settlements, which no client waits for, wait up to GW_REDIS_DEFER_MS to join the next
admissions): under load Redis reads each scope's state once per call, not twice per request,
and the fixed cost of a script call is shared. An admission is still one atomic round trip.

Far from every limit, an admission also takes a lease: room for a few more requests like it
from every limit at once, which this process then admits by itself, without a round trip, and
gives back unused when it is idle or old (`Lease`). Nothing is ever admitted beyond a limit;
what a lease holds out of other processes' sight is small (at most 1/64 of a limit, granted
only while every limit keeps half its room) and returns within GW_LIMITS_LEASE_SECONDS.

Money in Redis is integer nano-dollars; a price in USD per million tokens is exactly
1000 nano-dollars per token per unit of price.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import orjson
import redis.exceptions as rx
from django.conf import settings

from llm_platform.resp import get_resp, pack_args, raise_errors
from tenants.principal import Principal

from .api.errors import GatewayError
from .routing import LaneSpec
from .scripts import LuaFunction

NANO = Decimal(1_000_000_000)


LIMITS = LuaFunction("limits.lua", "gw_limits")
log = logging.getLogger(__name__)


def nano(amount: Decimal) -> int:
    return math.ceil(amount * NANO)  # Decimal's ceiling: exact


def reset_text(ms: int) -> bytes:
    """OpenAI's reset format: `120ms`, `1.5s`, `6m0s` (a header value: bytes). Remembered:
    under steady load the same few values come back on every answer."""
    text = _reset_texts.get(ms)
    if text is None:
        text = _format_reset(ms)
        if len(_reset_texts) < 10_000:
            _reset_texts[ms] = text
    return text


_reset_texts: dict[int, bytes] = {}


def _format_reset(ms: int) -> bytes:
    if ms < 1000:
        return b"%dms" % max(ms, 0)
    if ms < 60_000:
        return b"%.3gs" % (ms / 1000)
    minutes, rest = divmod(ms // 1000, 60)
    return b"%dm%ds" % (minutes, rest)


@dataclass(slots=True)
class Limit:
    """One bucket, slot set or budget, with the words a refusal uses."""

    kind: str  # bucket | slots | budget
    field: str  # the scope hash's field ("rpm", "d", ...); "" for slots
    name: str  # e.g. "requests per minute"
    scope: str  # "tenant" or "key"
    limit: int
    rate_per_ms: float = 0.0
    period: str = ""
    header: str = ""  # "requests" / "tokens" when it feeds x-ratelimit-* headers


@dataclass(slots=True)
class Scope:
    """The tenant's or one key's limits: one hash (buckets, spend) and one set (slots) in Redis."""

    label: str  # "tenant" or "key"
    hash_key: str
    slot_key: str
    buckets: list[Limit]
    slot_limit: int  # 0 = no concurrency limit
    budgets: list[Limit]
    ttl_ms: int  # the hash outlives every bucket's refill and every budget's period


_periods: tuple[int, tuple] = (-1, ())


def _current_periods() -> tuple[tuple[str, int], tuple[str, int]]:
    """The budget periods, computed at most once a second."""
    global _periods
    second = int(time.time())
    if _periods[0] != second:
        _periods = (second, period_ends(datetime.now(UTC)))
    return _periods[1]


def period_ends(now: datetime) -> tuple[tuple[str, int], tuple[str, int]]:
    """(day label, seconds left today), (month label, seconds left this month)."""
    day_end = datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp() + 86400
    month_end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC).timestamp()
    ts = now.timestamp()
    return (now.strftime("%Y-%m-%d"), int(day_end - ts) + 1), (now.strftime("%Y-%m"), int(month_end - ts) + 1)


_BUCKETS = (("requests_per_minute", "rpm", "requests per minute", 60_000, "requests"),
            ("requests_per_hour", "rph", "requests per hour", 3_600_000, ""),
            ("tokens_per_minute", "tpm", "tokens per minute", 60_000, "tokens"))
_BUDGETS = (("daily_budget_usd", "d", "daily budget", 0), ("monthly_budget_usd", "m", "monthly budget", 1))


def scope_prefix(tenant_id: int, key_id: int | None = None) -> str:
    """Where a scope's limits live: `<prefix>:lim` (buckets, spend) and `<prefix>:conc` (slots)."""
    return f"gw:{{t{tenant_id}}}" if key_id is None else f"gw:{{t{tenant_id}}}:k{key_id}"


def budget_ttl_ms(month_seconds_left: int) -> int:
    """A scope hash with budgets outlives its month by a day."""
    return (month_seconds_left + 86400) * 1000


def _scopes_for(principal: Principal, periods: tuple[tuple[str, int], tuple[str, int]]) -> list[Scope]:
    """Every limit that applies to this principal, by scope, for the budget `periods`
    (`period_ends`); costs are filled in per request."""
    sources = [("tenant", scope_prefix(principal.tenant_id),
                {name: getattr(principal, name) for name, *_ in _BUCKETS + _BUDGETS}
                | {"max_concurrent": principal.max_concurrent})]
    if principal.key_limits:
        sources.append(("key", scope_prefix(principal.tenant_id, principal.key_id), principal.key_limits))
    scopes = []
    for label, prefix, values in sources:
        buckets = [Limit("bucket", short, name, label, int(values[attr]), values[attr] / window, header=header)
                   for attr, short, name, window, header in _BUCKETS if values.get(attr)]
        budgets = [Limit("budget", short, name, label, nano(Decimal(values[attr])), period=periods[which][0])
                   for attr, short, name, which in _BUDGETS if values.get(attr) is not None]
        ttl_ms = max((int(b.limit / b.rate_per_ms) + 60_000 for b in buckets), default=60_000)
        if budgets:
            ttl_ms = max(ttl_ms, budget_ttl_ms(periods[1][1]))
        scopes.append(Scope(label, f"{prefix}:lim", f"{prefix}:conc", buckets, int(values.get("max_concurrent") or 0),
                            budgets, ttl_ms))
    return [s for s in scopes if s.buckets or s.slot_limit or s.budgets]


def estimate_nano(lane: LaneSpec, prompt_tokens: int, reserved_completion: int) -> int:
    per_input, per_output = _nano_per_token(lane.price_input), _nano_per_token(lane.price_output)
    if per_input is not None and per_output is not None:  # integers: exact, without Decimal's cost
        return prompt_tokens * per_input + reserved_completion * per_output
    return nano((prompt_tokens * lane.price_input + reserved_completion * lane.price_output) / 1_000_000)


@functools.lru_cache(maxsize=4096)
def _nano_per_token(price: Decimal) -> int | None:
    """Nano-dollars per token at `price` USD per million tokens, if that is a whole number."""
    value = price * 1000
    return int(value) if value == value.to_integral_value() else None


def unavailable() -> GatewayError:
    return GatewayError(503, "The platform's limit store is unreachable; retry shortly.", type="server_error",
                        code="limits_unavailable", headers={"Retry-After": "2"})


def _refusal(limit: Limit, retry_ms: int, headers: dict) -> GatewayError:
    retry = str(max(1, math.ceil(retry_ms / 1000)))
    who = "your organization" if limit.scope == "tenant" else "this API key"
    if limit.kind == "budget":
        return GatewayError(
            429, f"You exceeded the {limit.name} of {who} (${Decimal(int(limit.limit)) / NANO:.2f} for "
                 f"{limit.period}). It resets when the period ends.",
            type="insufficient_quota", code="insufficient_quota", headers={**headers, "Retry-After": retry})
    return GatewayError(
        429, f"Rate limit reached for {limit.name} of {who}: limit {int(limit.limit)}. Retry in {retry} s.",
        type="requests" if limit.header != "tokens" else "tokens", code="rate_limit_exceeded",
        headers={**headers, "Retry-After": retry})


@dataclass(slots=True)
class _Plan:
    """A principal's scopes, and their limits packed once for lua/limits.lua (the principal is
    immutable). A call carries each plan once, however many of its requests it admits or
    settles; an operation carries only its request's own values."""

    principal: Principal  # the last principal object it served (equal to every one it serves)
    until: float  # the end of the UTC day its budget periods name (epoch seconds)
    scopes: list[Scope]
    ordered: list[Limit]  # every limit in the script's refusal-index order
    token_capacity: int | None  # the smallest tokens-per-minute bucket
    slot_keys: list[str]
    keys: bytes = b""  # per scope: hash, slot set (packed)
    n_keys: int = 0
    name: str = ""  # a digest of its keys and arguments: what the script knows it by
    full: bytes = b""  # the plan's part of the script's arguments, spelled out (packed)
    n_full: int = 0
    short: bytes = b""  # the same, by name only
    leasable: bool = False  # its requests limits and slot limits are large enough for a lease
    budgeted: bool = False  # it has a budget

    header_buckets: list[tuple[int, Limit]] = field(default_factory=list)  # those that feed headers, and where

    # per header kind ("requests", "tokens"): its three header names, then the reply positions
    # (remaining, reset) and limit (as text) of the first bucket that feeds it, then those of
    # the others (a key with limits of its own), in the order the script reports buckets (bytes:
    # what the response carries)
    header_kinds: list[_HeaderKind] = field(default_factory=list)


class _HeaderKind(NamedTuple):
    limit_name: bytes
    remaining_name: bytes
    reset_name: bytes
    remaining_at: int  # the first bucket's remaining, in the script's reply; its reset follows
    limit: bytes
    others: tuple[tuple[int, bytes], ...]  # (remaining_at, limit) of the other buckets


_plans: dict[int, _Plan] = {}  # by key id


def _plan_for(principal: Principal) -> _Plan:
    """The principal's plan: one per key while its limits stay the same. Equal principals (the
    key looked up again when the process's cache expired, or by requests racing on a cold cache)
    share it, and so share its lease; a changed limit makes a new one."""
    plan = _plans.get(principal.key_id)
    if plan is not None and time.time() < plan.until:
        if plan.principal is principal:
            return plan
        if plan.principal == principal:
            plan.principal = principal  # the next ones come with this object: found at once
            return plan
    now = time.time()
    scopes = _scopes_for(principal, period_ends(datetime.fromtimestamp(now, UTC)))
    ordered, buckets, keys = [], [], []
    spec: list = [int(settings.GATEWAY["SLOT_TTL_SECONDS"] * 1000), principal.tenant_id, principal.key_id, len(scopes)]
    for scope in scopes:
        keys += (scope.hash_key, scope.slot_key)
        spec += (scope.label, len(scope.buckets), scope.slot_limit, len(scope.budgets), scope.ttl_ms)
        for bucket in scope.buckets:
            spec += (bucket.field, bucket.limit, repr(bucket.rate_per_ms), 1 if bucket.header == "tokens" else 0)
        for budget in scope.budgets:
            spec += (budget.field, budget.period, budget.limit)
        ordered += scope.buckets + ([Limit("slots", "", "concurrent requests", scope.label, scope.slot_limit)]
                                    if scope.slot_limit else []) + scope.budgets
        buckets += scope.buckets
    capacities = [b.limit for b in buckets if b.header == "tokens"]
    plan = _Plan(principal, (now // 86400 + 1) * 86400, scopes, ordered, min(capacities) if capacities else None, [scope.slot_key for scope in scopes if scope.slot_limit])
    least = LEASE_SHARE * LEASE_MIN  # below this, the script would never grant one: not asked
    plan.leasable = (all(b.limit >= least for b in buckets if b.header != "tokens")
                     and all(scope.slot_limit == 0 or scope.slot_limit >= least for scope in scopes))
    plan.budgeted = any(scope.budgets for scope in scopes)
    # The script reports remaining/reset for every bucket, in this order, after its leading 1.
    kinds: dict[str, list[tuple[int, bytes]]] = {}
    for i, bucket in enumerate(buckets):
        if bucket.header:
            kinds.setdefault(bucket.header, []).append((2 * i + 1, b"%d" % bucket.limit))
            plan.header_buckets.append((2 * i + 1, bucket))
    plan.header_kinds = [_HeaderKind(b"x-ratelimit-limit-" + kind.encode(), b"x-ratelimit-remaining-" + kind.encode(),
                                     b"x-ratelimit-reset-" + kind.encode(), *candidates[0], tuple(candidates[1:]))
                         for kind, candidates in kinds.items()]
    if scopes:
        plan.keys, plan.n_keys = pack_args(keys), len(keys)
        args = pack_args(spec)
        plan.name = hashlib.sha1(plan.keys + args).hexdigest()[:20]
        plan.full, plan.n_full = pack_args((plan.name, len(spec))) + args, 2 + len(spec)
        plan.short = pack_args((plan.name, 0))
    if len(_plans) > 10_000:
        _plans.clear()
    _plans[principal.key_id] = plan
    return plan


class Admission:
    """A request let in: what it reserved, and the x-ratelimit-* headers of its answer."""

    __slots__ = ("request_id", "tenant_id", "plan", "reserved_tokens", "estimate_nano", "header_pairs",
                 "release_first", "lease", "lease_wanted", "lease_id")

    def __init__(self, request_id: str, tenant_id: int, plan: _Plan, reserved_tokens: int = 0,
                 estimate_nano: int = 0) -> None:
        self.request_id = request_id
        self.tenant_id = tenant_id
        self.plan = plan
        self.reserved_tokens = reserved_tokens
        self.estimate_nano = estimate_nano
        self.header_pairs: list[tuple[bytes, bytes]] = []  # as the response carries them
        # Once it was admitted, a limit that its settlement gives back to (its slot, the tokens
        # it reserved beyond what it uses, its estimated spend) had room for fewer than two more
        # requests like it: its settlement goes to Redis before its answer's last bytes go to the
        # client, so that the client's next request, to any process, sees what it gave back.
        self.release_first = False
        self.lease: Lease | None = None  # admitted by this process from that lease
        self.lease_wanted = 0  # the units of lease its admission asked for
        self.lease_id = ""  # and the id it asked for it under

    @property
    def headers(self) -> dict[str, str]:
        return {name.decode(): value.decode() for name, value in self.header_pairs}

    @property
    def slot_keys(self) -> list[str]:
        return self.plan.slot_keys

    @property
    def slot_members(self) -> tuple[str, ...]:
        """Its concurrency slot's member in each slot set: its own, or its lease's (all of them)."""
        return self.lease.members() if self.lease is not None else (self.request_id,)


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


def prepare_admission(principal: Principal, request_id: str, tokens: int,
                      estimate: int) -> tuple[Admission, Operation | None] | tuple[None, None]:
    """The admission operation for this request, or (admission, None) when this process admitted
    it from a lease; (None, None) when the principal has no limits (nothing to admit or settle:
    its usage row is a plain XADD)."""
    plan = _plan_for(principal)
    if not plan.scopes:
        return None, None
    if plan.token_capacity is not None and tokens > plan.token_capacity:
        raise GatewayError(400, f"This request needs {tokens} tokens but the limit is {plan.token_capacity} tokens "
                                "per minute; lower max_tokens or shorten the prompt.",
                           code="request_exceeds_limit", param="max_tokens")
    admission = Admission(request_id, principal.tenant_id, plan, tokens, estimate)
    want = 0
    if plan.leasable:
        batcher = _batcher()
        lease = batcher.leases.get(id(plan))
        if lease is not None and lease.admit(admission):
            return admission, None
        want = batcher.lease_wanted(plan)
    if want:
        admission.lease_wanted = want
        admission.lease_id = _lease_id()
        return admission, _operation((plan, ADMIT_LEASE, _bulk3(request_id.encode(), b"%d" % tokens, b"%d" % estimate)
                                      + pack_args((want, admission.lease_id, LEASE_SLOTS)), 6))
    return admission, _operation((plan, ADMIT, _bulk3(request_id.encode(), b"%d" % tokens, b"%d" % estimate), 3))


def _bulk3(a: bytes, b: bytes, c: bytes) -> bytes:
    """Three RESP bulk strings (`pack_args` for the hot path's fixed shapes)."""
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(a), a, len(b), b, len(c), c)


def _bulk4(a: bytes, b: bytes, c: bytes, d: bytes) -> bytes:
    return b"$%d\r\n%b\r\n%b" % (len(a), a, _bulk3(b, c, d))


def finish_admission(admission: Admission, result) -> Admission:
    """Turn the admission's reply into headers, or raise the refusal (503 if Redis failed)."""
    if admission.lease_wanted:
        _batcher().lease_came(admission.plan, admission.lease_id, admission.reserved_tokens, admission.estimate_nano,
                              result)
    if isinstance(result, Exception):
        raise unavailable() from None
    if admission.lease_wanted and result[0] == 1:
        result = result[:-2]  # without the lease's units and slots: the crowded flag last, as for any admission
    if result[0] == 0:
        raise _refusal(admission.plan.ordered[result[1] - 1], int(result[2]), {})
    admission.header_pairs = _headers(admission.plan.header_kinds, result)
    admission.release_first = result[-1] == 1  # the script's last value: a limit is crowded
    return admission


def _headers(header_kinds: list[_HeaderKind], values: list) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* from the tightest requests and tokens buckets (tenant or key), as the
    response carries them. `values` is the script's answer: 1, then remaining and reset (ms)
    for each bucket."""
    headers = []
    for limit_name, remaining_name, reset_name, at, limit, others in header_kinds:
        remaining = values[at]
        for other_at, other_limit in others:  # a key with limits of its own: the tighter one
            if values[other_at] < remaining:
                at, limit, remaining = other_at, other_limit, values[other_at]
        headers += ((limit_name, limit), (remaining_name, b"%d" % remaining if remaining > 0 else b"0"),
                    (reset_name, reset_text(values[at + 1])))
    return headers


def settle_operation(admission: Admission, used_tokens: int, cost: Decimal, row: dict) -> Operation:
    """Refund or charge tokens, release the slot, settle spend, buffer the row: one operation."""
    refund = admission.reserved_tokens - used_tokens
    delta = nano(cost) - admission.estimate_nano
    values = _bulk4(admission.request_id.encode(), b"%d" % refund, b"%d" % delta, orjson.dumps(row, default=str))
    return _operation((admission.plan, SETTLE, values, 4))


def settle_locally(admission: Admission, used_tokens: int, cost: Decimal) -> None:
    """Settle a request admitted from a lease into that lease (its row goes to the usage stream
    as it is: `billing.recorder.record`)."""
    admission.lease.settle(admission, used_tokens, nano(cost))


# A lease: at most this share of a bucket, a slot set (a quarter of it for a budget), and at least
# this many requests, or none (lua/limits.lua's LEASE_SHARE and LEASE_MIN). Its slots: this many
# for a plan's first lease, then twice the requests in flight from the one it replaces, plus this.
LEASE_SHARE, LEASE_MIN = 64, 4
LEASE_SLOTS, MAX_LEASE_SLOTS = 8, 512
_lease_ids = itertools.count(1)
_PROCESS_TAG = secrets.token_hex(6)  # lease ids (slot members) of different processes never meet


def _lease_id() -> str:
    return f"{_PROCESS_TAG}.{next(_lease_ids):x}"


class Lease:
    """Room for `units` more requests like the one that took it, taken from every limit of its
    plan at once (lua/limits.lua's 'L'): this process admits requests from it without a round
    trip while it lasts, each taking one request, its tokens and its estimate (and a slot, given
    back to the lease when it ends); refunds and overshoots settle into it. It stops admitting
    after GW_LIMITS_LEASE_SECONDS, when idle for a tenth of that, or when a request does not fit;
    then, once its last request has settled, what it holds goes back to Redis in one operation
    ('r'). A process that dies holding one loses that room until the buckets refill, the slots
    expire (GW_SLOT_TTL_SECONDS) and, for budgets, the period ends: at most 1/256 of a budget."""

    __slots__ = ("batcher", "plan", "lease_id", "units", "slots", "requests", "tokens", "nano", "free_slots",
                 "in_flight", "tokens_granted", "snapshot", "last_used", "ends", "idle_s", "closing", "timer",
                 "returned", "renewing", "_members")

    def __init__(self, batcher: _Batcher, plan: _Plan, lease_id: str, units: int, slots: int, tokens: int,
                 estimate: int, reply: list):
        self.batcher, self.plan, self.lease_id, self.units = batcher, plan, lease_id, units
        self.requests = units
        self.tokens = self.tokens_granted = units * tokens
        self.nano = units * estimate
        self.slots = slots  # slot members <lease id>~<i> it holds (none without a slot limit)
        self.free_slots = self.slots if plan.slot_keys else 1 << 30  # no slot limit: never short
        self.renewing = False  # the next lease was asked for
        self.in_flight = 0
        self.snapshot = reply  # the admitting request's reply: each bucket's remaining, as of then
        self.last_used = time.monotonic()
        self.ends = self.last_used + settings.GATEWAY["LEASE_SECONDS"]  # it admits nothing after this
        self.idle_s = settings.GATEWAY["LEASE_SECONDS"] / 10  # nor after this long unused
        self.closing = self.returned = False
        self.timer = batcher.loop.call_later(self.idle_s, self.check)
        self._members: tuple[str, ...] = ()

    def members(self) -> tuple[str, ...]:
        if not self._members:
            self._members = tuple(f"{self.lease_id}~{i}" for i in range(1, self.slots + 1))
        return self._members

    def admit(self, admission: Admission) -> bool:
        """Admit this request from the lease, if it fits and the lease is still fresh."""
        now = time.monotonic()
        if (self.requests < 1 or self.free_slots < 1 or now > self.ends
                or (self.plan.token_capacity is not None and self.tokens < admission.reserved_tokens)
                or (self.plan.budgeted and self.nano < admission.estimate_nano)):
            self.close()
            return False
        self.requests -= 1
        self.tokens -= admission.reserved_tokens
        self.nano -= admission.estimate_nano
        self.free_slots -= 1
        self.in_flight += 1
        self.last_used = now
        admission.lease = self
        admission.header_pairs = self.headers()
        if not self.renewing and self.running_low(admission):
            # the next one comes before this one runs out, with slots for twice the requests it has in flight
            self.renewing = self.batcher.renew(self.plan, admission, min(2 * self.in_flight + LEASE_SLOTS, MAX_LEASE_SLOTS))
        return True

    def running_low(self, admission: Admission) -> bool:
        """A quarter or less of something it holds is left, for requests like this one."""
        quarter = self.units // 4
        return (self.requests <= quarter or self.free_slots <= self.slots // 4
                or (self.plan.token_capacity is not None and self.tokens <= quarter * admission.reserved_tokens)
                or (self.plan.budgeted and self.nano <= quarter * admission.estimate_nano))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """x-ratelimit-* as of the lease's grant, less what this process has taken since."""
        values = self.snapshot.copy()
        used_requests, used_tokens = self.units - self.requests, self.tokens_granted - self.tokens
        for at, bucket in self.plan.header_buckets:
            values[at] = remaining = values[at] - (used_tokens if bucket.header == "tokens" else used_requests)
            values[at + 1] = math.ceil((bucket.limit - remaining) / bucket.rate_per_ms)
        return _headers(self.plan.header_kinds, values)

    def count_in(self, old: Lease) -> None:
        """Its headers also count what `old`, which it replaces, has not used: that goes back
        to the buckets, which its own snapshot, taken while `old` held it, did not show."""
        snapshot = list(self.snapshot)
        for at, bucket in self.plan.header_buckets:
            snapshot[at] += old.tokens if bucket.header == "tokens" else old.requests
        self.snapshot = snapshot

    def settle(self, admission: Admission, used_tokens: int, cost_nano: int) -> None:
        self.tokens += admission.reserved_tokens - used_tokens
        self.nano += admission.estimate_nano - cost_nano
        self.free_slots += 1
        self.in_flight -= 1
        if self.closing and self.in_flight == 0:
            self.give_back()

    def check(self) -> None:
        """The lease's timer: close it when idle or old."""
        now = time.monotonic()
        if now - self.last_used >= self.idle_s or now >= self.ends:
            self.close()
        elif not self.closing:
            self.timer = self.batcher.loop.call_later(self.idle_s, self.check)

    def close(self) -> None:
        """Admit nothing more from it; give back what it holds once its requests have settled."""
        if self.closing:
            return
        self.closing = True
        self.timer.cancel()
        if self.batcher.leases.get(id(self.plan)) is self:
            del self.batcher.leases[id(self.plan)]
        if self.in_flight == 0:
            self.give_back()

    def give_back(self) -> None:
        if self.returned:
            return
        self.returned = True
        values = pack_args((self.lease_id, self.slots, self.requests, self.tokens, self.nano))
        # It rides with the next call (the next lease's, say), or goes alone once idle long enough.
        done = self.batcher.submit(_operation((self.plan, RETURN, values, 5)), self.idle_s, None)
        self.batcher.returning[self] = done
        done.add_done_callback(self._returned)

    def _returned(self, done: asyncio.Future) -> None:
        self.batcher.returning.pop(self, None)
        if done.cancelled() or done.exception() is not None:
            log.warning("could not give a lease back; its room returns as the limits refill and its slots expire",
                        extra={"lease_id": self.lease_id})


async def give_back_leases() -> None:
    """Close this loop's leases and wait until Redis has what they held (graceful shutdown;
    settle the requests in flight first)."""
    batcher = _batchers.get(asyncio.get_running_loop())
    if batcher is None:
        return
    for lease in list(batcher.leases.values()):
        lease.close()
    if batcher.returning:
        batcher.flush()
        await asyncio.wait(list(batcher.returning.values()), timeout=5)


def submit(operation: Operation, defer: bool | float = False,
           abandoned: Callable[[list], None] | None = None, at_once: bool = False) -> asyncio.Future:
    """Queue an operation for this loop's next call of lua/limits.lua; its reply as a future
    (a Redis failure as its exception). `defer`: it may wait up to GW_REDIS_DEFER_MS (or, a
    number, that many seconds) for an admission to ride with (settlements and leases given
    back: no client waits for them). `at_once`: it is written
    to Redis before this returns, with whatever else is queued, even while a call is in
    flight. `abandoned(reply)` is called with the reply when the future was cancelled before
    it came (its caller is gone, but Redis ran the operation)."""
    batcher = _batcher()
    waiter = batcher.submit(operation, defer, abandoned)
    if at_once:
        batcher.flush()
    return waiter


def _batcher() -> _Batcher:
    """This event loop's batcher."""
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        for old in [old for old in _batchers if old.is_closed()]:
            del _batchers[old]
        batcher = _batchers[loop] = _Batcher(loop)
    return batcher


_Queued = tuple[Operation, asyncio.Future, Callable[[list], None] | None]


class _Batcher:
    """One event loop's operations not yet sent; settlements go first in a call, so that the
    slots and tokens they free serve the admissions after them.

    At most one call is in flight: admissions that arrive meanwhile go out together when its
    reply comes back (group commit). An idle process sends an admission at the end of the loop
    iteration, as before; a busy one sends one call per round trip instead of one per request,
    which is where Redis and the platform spend their time (the write, the wake-up, the read)."""

    __slots__ = ("loop", "settles", "admits", "soon", "later", "later_at", "inflight", "overdue", "known", "leases", "leasing",
                 "returning")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.settles: list[_Queued] = []
        self.admits: list[_Queued] = []
        self.soon = False  # a call is due at the end of this loop iteration
        self.later: asyncio.Handle | None = None  # a call of deferred settlements is due …
        self.later_at = 0.0  # … at this loop time
        self.inflight = 0  # calls sent, not answered
        self.overdue = False  # deferred settlements are due, a call being in flight
        self.known: set[str] = set()  # the plans sent in full (Redis keeps them): sent by name
        self.leases: dict[int, Lease] = {}  # by id(plan): the lease this loop admits from
        self.leasing: dict[int, float] = {}  # by id(plan): when an admission asking for a lease left
        self.returning: dict[Lease, asyncio.Future] = {}  # leases given back, Redis not yet answered

    def lease_wanted(self, plan: _Plan) -> int:
        """The units of lease an admission for this plan should ask for: none while another
        admission's request for one is on its way (for a second at most)."""
        units = settings.GATEWAY["LEASE_UNITS"]
        if units <= 0:
            return 0
        now = time.monotonic()
        asked = self.leasing.get(id(plan))
        if asked is not None and now - asked < 1.0:
            return 0
        self.leasing[id(plan)] = now
        return units

    def renew(self, plan: _Plan, admission: Admission, slots: int) -> bool:
        """Ask for a lease alone (lua/limits.lua's 'l') for requests like this one, unless one is
        on its way: it replaces the plan's current lease when it comes."""
        want = self.lease_wanted(plan)
        if not want:
            return False
        lease_id = _lease_id()
        tokens, estimate = admission.reserved_tokens, admission.estimate_nano
        values = pack_args((lease_id, tokens, estimate, want, slots))

        def came(reply: asyncio.Future) -> None:  # a failure: the next request that does not fit asks again
            failed = reply.cancelled() or reply.exception() is not None
            self.lease_came(plan, lease_id, tokens, estimate, None if failed else reply.result())

        self.submit(_operation((plan, LEASE, values, 5)), False, None).add_done_callback(came)
        return True

    def lease_came(self, plan: _Plan, lease_id: str, tokens: int, estimate: int, reply) -> None:
        """The reply of an operation that asked for a lease ('L' or 'l'; an exception or None if
        it failed): its last two values are the units and slots granted. A lease granted replaces the plan's current
        one, whose unused room its headers count in."""
        self.leasing.pop(id(plan), None)
        if reply is None or isinstance(reply, BaseException) or reply[0] != 1 or reply[-2] <= 0:
            return
        lease = Lease(self, plan, lease_id, reply[-2], reply[-1], tokens, estimate, reply)
        old = self.leases.get(id(plan))
        if old is not None:
            lease.count_in(old)
            old.close()
        self.leases[id(plan)] = lease

    def submit(self, operation: Operation, defer: bool | float,
               abandoned: Callable[[list], None] | None) -> asyncio.Future:
        """`defer`: False, at the end of this loop iteration; True, within GW_REDIS_DEFER_MS;
        a number, within that many seconds (with any call that leaves before)."""
        waiter = self.loop.create_future()
        (self.settles if operation.kind & 1 else self.admits).append((operation, waiter, abandoned))
        if defer is False:
            if not self.soon and self.inflight == 0:
                self.soon = True
                self.loop.call_soon(self.flush)
        elif not self.soon:
            when = self.loop.time() + (settings.GATEWAY["REDIS_DEFER_MS"] / 1000 if defer is True else defer)
            if self.later is None or self.later_at > when:
                if self.later is not None:
                    self.later.cancel()
                # its own note of when: uvloop answers a delay under half a millisecond with a
                # plain Handle, which has no when()
                self.later, self.later_at = self.loop.call_at(when, self.due), when
        return waiter

    def due(self) -> None:
        """Deferred settlements waited long enough: they go now, or with the next call if one
        is in flight."""
        self.later = None
        if self.inflight == 0:
            self.flush()
        else:
            self.overdue = True

    def flush(self) -> None:
        self.soon = self.overdue = False
        if self.later is not None:
            self.later.cancel()
            self.later = None
        queued = self.settles + self.admits
        self.settles, self.admits = [], []
        for start in range(0, len(queued), MAX_CALL_OPERATIONS):  # a burst must not hold Redis long
            self.send(queued[start:start + MAX_CALL_OPERATIONS])

    def send(self, batch: list[_Queued], spelled_out: bool = False) -> None:
        """`spelled_out`: every plan in full (Redis said NOPLAN to the call by names)."""
        try:
            get_resp().call_now(LIMITS, _call(batch, self.known, spelled_out), _Call(self, batch, spelled_out))
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
            _deliver(batch, exc)
            return
        self.inflight += 1  # its reply comes in a later iteration

    def answered(self, call: _Call, outcome) -> None:
        self.inflight -= 1
        if not call.spelled_out and isinstance(outcome, rx.ResponseError) and str(outcome).startswith("NOPLAN"):
            # Redis does not have a plan this call named (the library was loaded again, or it
            # let its plans go): nothing ran; the same operations go again, every plan in full.
            self.known.clear()
            self.send(call.batch, spelled_out=True)
        else:
            _deliver(call.batch, outcome)
        if (self.admits or self.overdue) and not self.soon and self.inflight == 0:
            self.soon = True
            self.loop.call_soon(self.flush_after, FLUSH_AFTER_ITERATIONS)

    def flush_after(self, iterations: int) -> None:
        """Flush `iterations` loop iterations from now: each polls for I/O, and the requests
        that arrive meanwhile join the call."""
        if iterations > 1:
            self.loop.call_soon(self.flush_after, iterations - 1)
        else:
            self.flush()


# Admissions held behind a call go out this many loop iterations after its reply: its waiters
# resume at once, and the requests whose I/O is ready meanwhile join the next call. At c=8 in
# bench/limits.py, 1 iteration made calls of ~2.3 requests and cost 0.83-0.85 of throughput;
# 3 made ~2.8 and 0.86-0.90 (the reply used to reach the batcher through two such hops).
FLUSH_AFTER_ITERATIONS = 3


class _Call:
    """One call of lua/limits.lua in flight: the connection hands it the reply as soon as it
    is read (`resp.RespClient.call_now`), and it hands each operation's reply to its waiter."""

    __slots__ = ("batcher", "batch", "spelled_out", "finished")

    def __init__(self, batcher: _Batcher, batch: list[_Queued], spelled_out: bool):
        self.batcher, self.batch, self.spelled_out = batcher, batch, spelled_out
        self.finished = False

    def done(self) -> bool:
        return False  # its waiters may be gone, but the operations ran: abandoned() hears of them

    def set_result(self, reply) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.batcher.answered(self, reply)
        except Exception as exc:  # noqa: BLE001 - a bug here must not break the connection
            log.exception("limits: could not hand out a reply")
            _deliver(self.batch, exc)

    def set_exception(self, exc: BaseException) -> None:
        self.set_result(exc if isinstance(exc, Exception) else rx.ConnectionError(str(exc)))


_batchers: dict[asyncio.AbstractEventLoop, _Batcher] = {}
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
    n_keys, n_args = 2, 3
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
    keys.append(_streams())
    (_, day_left), (_, month_left) = _current_periods()
    return LIMITS.assemble(n_keys, keys, n_args,
                           [_bulk3(b"%d" % len(index), b"%d" % day_left, b"%d" % month_left), *plans, *operations])


_streams_packed: tuple[str, str, bytes] = ("", "", b"")


def _streams() -> bytes:
    """The usage and alert streams' names, packed (again only when the settings change)."""
    global _streams_packed
    gateway = settings.GATEWAY
    usage, alert = gateway["USAGE_STREAM"], gateway["ALERT_STREAM"]
    if _streams_packed[0] != usage or _streams_packed[1] != alert:
        _streams_packed = (usage, alert, pack_args((usage, alert)))
    return _streams_packed[2]


def _deliver(batch: list[_Queued], outcome) -> None:
    """Each operation's reply to its waiter, or the call's failure to every waiter."""
    for i, (_, waiter, abandoned) in enumerate(batch):
        if waiter.done():  # its caller was cancelled
            if abandoned is not None and not isinstance(outcome, BaseException):
                abandoned(outcome[i])
            continue
        if isinstance(outcome, BaseException):
            waiter.set_exception(type(outcome)(*outcome.args))
        elif isinstance(outcome[i], Exception):  # that operation's own error; the others went on
            waiter.set_exception(outcome[i])
        else:
            waiter.set_result(outcome[i])


async def refresh_slots(admissions: list[Admission]) -> None:
    """Keep long calls' concurrency slots alive (slots expire so dead workers free them)."""
    ttl_ms = int(settings.GATEWAY["SLOT_TTL_SECONDS"] * 1000)
    expiry = int(time.time() * 1000) + ttl_ms
    commands, keys, leases = [], set(), set()
    for admission in admissions:
        if admission.lease is not None:  # its lease's slots, once
            if admission.lease in leases:
                continue
            leases.add(admission.lease)
        pairs = [value for member in admission.slot_members for value in (expiry, member)]
        for key in admission.slot_keys:
            commands.append(("ZADD", key, "XX", *pairs))
            keys.add(key)
    commands += [("PEXPIRE", key, ttl_ms + 60_000) for key in keys]  # once per set, not per call in it
    raise_errors(await get_resp().execute_many(commands))
