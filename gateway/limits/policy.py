"""What limits a principal has, and what a request costs against them: scopes, plans, estimates,
refusals.

A principal's limits are grouped by scope (the tenant, and a key with limits of its own); each
scope keeps one hash (buckets, spend) and one sorted set (slots) in Redis. A plan is those scopes
and limits, packed once for lua/limits.lua and kept while the principal's limits stay the same.

Money (integer nano-dollars) and budget periods are billing's (`billing.periods`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

from django.conf import settings

from billing.periods import NANO, Periods, budget_ttl_ms, nano, period_ends
from tenants.principal import Principal

from ..errors import GatewayError
from ..routing import LaneSpec
from .wire import pack_plan

# A lease: at most this share of a bucket, a slot set (a quarter of it for a budget), and at least
# this many requests, or none (lua/limits.lua's LEASE_SHARE and LEASE_MIN).
LEASE_SHARE, LEASE_MIN = 64, 4


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

    @property
    def tag(self) -> str:
        """What lua/limits.lua's replies call it: its scope's initial and its field (`t:rpm`,
        `k:slots`, `t:d`)."""
        return f"{self.scope[0]}:{self.field or 'slots'}"


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


_BUCKETS = (("requests_per_minute", "rpm", "requests per minute", 60_000, "requests"),
            ("requests_per_hour", "rph", "requests per hour", 3_600_000, ""),
            ("tokens_per_minute", "tpm", "tokens per minute", 60_000, "tokens"))
_BUDGETS = (("daily_budget_usd", "d", "daily budget", 0), ("monthly_budget_usd", "m", "monthly budget", 1))


def scope_prefix(tenant_id: int, key_id: int | None = None) -> str:
    """Where a scope's limits live: `<prefix>:lim` (buckets, spend) and `<prefix>:conc` (slots)."""
    return f"gw:{{t{tenant_id}}}" if key_id is None else f"gw:{{t{tenant_id}}}:k{key_id}"


def _scopes_for(principal: Principal, periods: Periods) -> list[Scope]:
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
    by_tag: dict[str, Limit]  # every limit, by the tag the script's replies name it by
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

    header_buckets: list[tuple[str, Limit]] = field(default_factory=list)  # those that feed headers, by tag

    # per header kind ("requests", "tokens"): its three header names, then the tag and limit (as
    # text) of the first bucket that feeds it, then those of the others (a key with limits of its
    # own) (bytes: what the response carries)
    header_kinds: list[_HeaderKind] = field(default_factory=list)


class _HeaderKind(NamedTuple):
    limit_name: bytes
    remaining_name: bytes
    reset_name: bytes
    tag: str  # the first bucket's, in the script's reply: its {remaining, reset ms}
    limit: bytes
    others: tuple[tuple[str, bytes], ...]  # (tag, limit) of the other buckets


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
    ordered, buckets = [], []
    for scope in scopes:
        ordered += scope.buckets + ([Limit("slots", "", "concurrent requests", scope.label, scope.slot_limit)]
                                    if scope.slot_limit else []) + scope.budgets
        buckets += scope.buckets
    capacities = [b.limit for b in buckets if b.header == "tokens"]
    plan = _Plan(principal, (now // 86400 + 1) * 86400, scopes, {limit.tag: limit for limit in ordered},
                 min(capacities) if capacities else None, [scope.slot_key for scope in scopes if scope.slot_limit])
    least = LEASE_SHARE * LEASE_MIN  # below this, the script would never grant one: not asked
    plan.leasable = (all(b.limit >= least for b in buckets if b.header != "tokens")
                     and all(scope.slot_limit == 0 or scope.slot_limit >= least for scope in scopes))
    plan.budgeted = any(scope.budgets for scope in scopes)
    # The script reports {remaining, reset} for every bucket, under the bucket's tag.
    kinds: dict[str, list[tuple[str, bytes]]] = {}
    for bucket in buckets:
        if bucket.header:
            kinds.setdefault(bucket.header, []).append((bucket.tag, b"%d" % bucket.limit))
            plan.header_buckets.append((bucket.tag, bucket))
    plan.header_kinds = [_HeaderKind(b"x-ratelimit-limit-" + kind.encode(), b"x-ratelimit-remaining-" + kind.encode(),
                                     b"x-ratelimit-reset-" + kind.encode(), *candidates[0], tuple(candidates[1:]))
                         for kind, candidates in kinds.items()]
    if scopes:
        packed = pack_plan(int(settings.GATEWAY["SLOT_TTL_SECONDS"] * 1000), principal.tenant_id, principal.key_id,
                           scopes)
        plan.keys, plan.n_keys, plan.name, plan.full, plan.n_full, plan.short = packed
    if len(_plans) > 10_000:
        _plans.clear()
    _plans[principal.key_id] = plan
    return plan


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
