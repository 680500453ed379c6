"""Per-tenant and per-key limits, enforced atomically in Redis for every process at once.

Admission is one EVALSHA (lua/admit.lua) that checks, then reserves: token buckets for
requests/min, requests/hour and tokens/min (bursts up to the bucket, the average enforced),
concurrency slots (a sorted set of request ids scored by expiry, so a dead worker's slot frees
itself), and daily/monthly spend. Settlement is one more EVALSHA (lua/settle.lua) that refunds
unused reserved tokens (or charges an overshoot), releases the slot, settles spend from the real
cost, raises 80%/100% budget alerts once per period and buffers the usage row.

Money in Redis is integer nano-dollars; a price in USD per million tokens is exactly
1000 nano-dollars per token per unit of price.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import orjson
from django.conf import settings

from llm_platform.redis import get_async_redis
from tenants.principal import Principal

from .api.errors import GatewayError
from .routing import LaneSpec

_LUA = Path(__file__).with_name("lua")
NANO = Decimal(1_000_000_000)


class _Script:
    """A Lua script loaded once per client, called by SHA (re-loaded after a Redis restart)."""

    def __init__(self, name: str) -> None:
        self.source = (_LUA / name).read_text()
        self._scripts: dict[int, object] = {}

    def _for(self, client):
        script = self._scripts.get(id(client))
        if script is None:
            script = self._scripts[id(client)] = client.register_script(self.source)
        return script

    def __call__(self, client, keys: list, args: list):
        return self._for(client)(keys=keys, args=args)

    def call(self, keys: list, args: list) -> ScriptCall:
        return ScriptCall(self, keys, args)


@dataclass(slots=True)
class ScriptCall:
    """One prepared script invocation; several run in a single pipeline (one round trip)."""

    script: _Script
    keys: list
    args: list


async def run_scripts(calls: list[ScriptCall]) -> list:
    """Run prepared scripts in one round trip; results in order. Raises on a Redis failure."""
    if not calls:
        return []
    client = get_async_redis()
    if len(calls) == 1:
        return [await calls[0].script(client, calls[0].keys, calls[0].args)]
    async with client.pipeline(transaction=False) as pipe:
        for call in calls:
            script = call.script._for(client)
            await script(keys=call.keys, args=call.args, client=pipe)
        return await pipe.execute()


ADMIT = _Script("admit.lua")
SETTLE = _Script("settle.lua")


def nano(amount: Decimal) -> int:
    return int((amount * NANO).to_integral_value(rounding=ROUND_CEILING))


def reset_text(ms: int) -> str:
    """OpenAI's reset format: `120ms`, `1.5s`, `6m0s`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass(slots=True)
class Limit:
    """One bucket, slot set or budget, with the words a refusal uses."""

    kind: str  # bucket | slots | budget
    key: str
    name: str  # e.g. "requests per minute"
    scope: str  # "tenant" or "key"
    limit: float
    rate_per_ms: float = 0.0
    period: str = ""
    ttl: int = 0
    header: str = ""  # "requests" / "tokens" when it feeds x-ratelimit-* headers


@dataclass(slots=True)
class Admission:
    request_id: str
    tenant_id: int
    buckets: list[Limit] = field(default_factory=list)
    slots: list[Limit] = field(default_factory=list)
    budgets: list[Limit] = field(default_factory=list)
    reserved_tokens: int = 0
    estimate_nano: int = 0
    headers: dict[str, str] = field(default_factory=dict)


_periods: tuple[int, tuple] = (-1, ())


def _current_periods() -> tuple[tuple[str, int], tuple[str, int]]:
    """The budget periods, computed at most once a second."""
    global _periods
    second = int(time.time())
    if _periods[0] != second:
        _periods = (second, _period_ends(datetime.now(UTC)))
    return _periods[1]


def _period_ends(now: datetime) -> tuple[tuple[str, int], tuple[str, int]]:
    """(day label, seconds left today), (month label, seconds left this month)."""
    day_end = datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp() + 86400
    month_end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC).timestamp()
    ts = now.timestamp()
    return (now.strftime("%Y-%m-%d"), int(day_end - ts) + 1), (now.strftime("%Y-%m"), int(month_end - ts) + 1)


def _limits_for(principal: Principal) -> list[Limit]:
    """Every limit that applies to this principal; costs are filled in per request."""
    out: list[Limit] = []
    (day, day_ttl), (month, month_ttl) = _current_periods()
    scopes = [("tenant", f"gw:{{t{principal.tenant_id}}}", {
        name: getattr(principal, name) for name in (
            "requests_per_minute", "requests_per_hour", "tokens_per_minute", "max_concurrent",
            "daily_budget_usd", "monthly_budget_usd")})]
    if principal.key_limits:
        scopes.append(("key", f"gw:{{t{principal.tenant_id}}}:k{principal.key_id}", principal.key_limits))
    for scope, base, values in scopes:
        if values.get("requests_per_minute"):
            n = values["requests_per_minute"]
            out.append(Limit("bucket", f"{base}:rpm", "requests per minute", scope, n, n / 60_000, header="requests"))
        if values.get("requests_per_hour"):
            n = values["requests_per_hour"]
            out.append(Limit("bucket", f"{base}:rph", "requests per hour", scope, n, n / 3_600_000))
        if values.get("tokens_per_minute"):
            n = values["tokens_per_minute"]
            out.append(Limit("bucket", f"{base}:tpm", "tokens per minute", scope, n, n / 60_000, header="tokens"))
        if values.get("max_concurrent"):
            out.append(Limit("slots", f"{base}:conc", "concurrent requests", scope, values["max_concurrent"]))
        for field_name, label, period, ttl in (("daily_budget_usd", "daily budget", day, day_ttl),
                                               ("monthly_budget_usd", "monthly budget", month, month_ttl)):
            if values.get(field_name) is not None:
                cap = nano(Decimal(values[field_name]))
                out.append(Limit("budget", f"{base}:spend:{period}", label, scope, cap, period=period, ttl=ttl))
    return out


def estimate_nano(lane: LaneSpec, prompt_tokens: int, reserved_completion: int) -> int:
    return nano((prompt_tokens * lane.price_input + reserved_completion * lane.price_output) / 1_000_000)


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
    """A principal's limits, keys and script arguments, built once (the principal is immutable)."""

    principal: Principal  # held so that id() stays this principal's while cached
    period: str
    buckets: list[Limit]
    slots: list[Limit]
    budgets: list[Limit]
    keys: list[str]
    bucket_args: list[tuple[float, str, bool]]  # (capacity, refill per ms as text, costs tokens?)
    slot_args: list[float]
    budget_args: list[tuple[int, int]]  # (cap, 0 for the day's budget / 1 for the month's)


_plans: dict[int, _Plan] = {}


def _plan_for(principal: Principal) -> _Plan:
    day = _current_periods()[0][0]
    plan = _plans.get(id(principal))
    if plan is not None and plan.principal is principal and plan.period == day:
        return plan
    limits = _limits_for(principal)
    buckets = [limit for limit in limits if limit.kind == "bucket"]
    slots = [limit for limit in limits if limit.kind == "slots"]
    budgets = [limit for limit in limits if limit.kind == "budget"]
    plan = _Plan(principal, day, buckets, slots, budgets, [limit.key for limit in buckets + slots + budgets],
                 [(b.limit, repr(b.rate_per_ms), b.header == "tokens") for b in buckets],
                 [slot.limit for slot in slots], [(int(m.limit), 0 if m.period == day else 1) for m in budgets])
    if len(_plans) > 10_000:
        _plans.clear()
    _plans[id(principal)] = plan
    return plan


def prepare_admission(principal: Principal, request_id: str, tokens: int, estimate: int) -> tuple[Admission, ScriptCall | None]:
    """The admission script call for this request (None when the principal has no limits)."""
    plan = _plan_for(principal)
    admission = Admission(request_id=request_id, tenant_id=principal.tenant_id, reserved_tokens=tokens,
                          estimate_nano=estimate, buckets=plan.buckets, slots=plan.slots, budgets=plan.budgets)
    if not plan.keys:
        return admission, None
    for capacity, _rate, costs_tokens in plan.bucket_args:
        if costs_tokens and tokens > capacity:
            raise GatewayError(400, f"This request needs {tokens} tokens but the limit is {int(capacity)} tokens "
                                    "per minute; lower max_tokens or shorten the prompt.",
                               code="request_exceeds_limit", param="max_tokens")
    args: list = [len(plan.buckets), len(plan.slots), len(plan.budgets), request_id,
                  int(settings.GATEWAY["SLOT_TTL_SECONDS"] * 1000)]
    for capacity, rate, costs_tokens in plan.bucket_args:
        args += (capacity, rate, tokens if costs_tokens else 1)
    args += plan.slot_args
    periods = _current_periods()
    for cap, which in plan.budget_args:
        args += (cap, estimate, periods[which][1])  # seconds left in the period, fresh each second
    return admission, ADMIT.call(plan.keys, args)


def finish_admission(admission: Admission, result) -> Admission:
    """Turn the admission script's answer into headers, or raise the refusal."""
    if isinstance(result, Exception):
        raise unavailable() from None
    if result[0] == 0:
        ordered = admission.buckets + admission.slots + admission.budgets
        raise _refusal(ordered[result[1] - 1], int(result[2]), {})
    admission.headers = _headers(admission.buckets, result[1:])
    return admission


def _headers(buckets: list[Limit], values: list) -> dict[str, str]:
    """x-ratelimit-* from the tightest requests and tokens buckets (tenant or key)."""
    chosen: dict[str, tuple[Limit, int, int]] = {}
    for i, bucket in enumerate(buckets):
        if not bucket.header:
            continue
        remaining, reset_ms = int(values[2 * i]), int(values[2 * i + 1])
        best = chosen.get(bucket.header)
        if best is None or remaining < best[1]:
            chosen[bucket.header] = (bucket, remaining, reset_ms)
    headers = {}
    for kind, (bucket, remaining, reset_ms) in chosen.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.limit))
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
        headers[f"x-ratelimit-reset-{kind}"] = reset_text(reset_ms)
    return headers


def usage_stream() -> str:
    return settings.GATEWAY["USAGE_STREAM"]


def alert_stream() -> str:
    return settings.GATEWAY["ALERT_STREAM"]


def settle_call(admission: Admission, used_tokens: int, cost: Decimal, row: dict) -> ScriptCall:
    """Refund or charge tokens, release the slot, settle spend, buffer the row: one script."""
    buckets = [b for b in admission.buckets if b.header == "tokens"]
    keys = [b.key for b in buckets] + [s.key for s in admission.slots] + [m.key for m in admission.budgets]
    keys += [usage_stream(), alert_stream()]
    args: list = [len(buckets), len(admission.slots), len(admission.budgets), admission.request_id]
    for b in buckets:
        args += [b.limit, repr(b.rate_per_ms), admission.reserved_tokens - used_tokens]
    delta = nano(cost) - admission.estimate_nano
    for m in admission.budgets:
        args += [int(m.limit), delta, m.ttl, m.scope, m.period]
    args += [orjson.dumps(row, default=str), admission.tenant_id]
    return SETTLE.call(keys, args)


async def refresh_slots(admission: Admission) -> None:
    """Keep a long call's concurrency slot alive (slots expire so dead workers free them)."""
    if not admission.slots:
        return
    expiry = time.time() * 1000 + settings.GATEWAY["SLOT_TTL_SECONDS"] * 1000
    client = get_async_redis()
    async with client.pipeline(transaction=False) as pipe:
        for slot in admission.slots:
            pipe.zadd(slot.key, {admission.request_id: expiry}, xx=True)
        await pipe.execute()
