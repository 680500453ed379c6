"""Lane health shared by every process: circuit breakers, coordinated 429 holds, upstream budgets.

`acquire` asks Redis whether this process may call a lane now (lua/lane_acquire.lua) and
`report` tells it how the call went (lua/lane_report.lua); both are one EVALSHA. Breaker
transitions are appended to an events stream that the usage writer stores for admin.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass

import redis.exceptions
from django.conf import settings

from .lane_policy import LanePolicy, policy_for
from .providers.base import UpstreamError
from .routing import LaneSpec
from .scripts import LuaScript, ScriptCall, run_scripts

log = logging.getLogger("gateway.resilience")
ACQUIRE = LuaScript("lane_acquire.lua")
REPORT = LuaScript("lane_report.lua")
REASONS = {
    "held": "rate limited by the provider",
    "open": "circuit open",
    "probing": "circuit half-open, probe in flight",
    "upstream_budget": "provider account budget reached",
}


def lane_id(lane: LaneSpec) -> str:
    """One breaker per provider + upstream model + credential, whatever routes share it."""
    identity = f"{lane.provider}|{lane.base_url}|{lane.upstream_model}|{lane.api_key_env}"
    return hashlib.sha1(identity.encode()).hexdigest()[:16]


def lane_label(lane: LaneSpec) -> str:
    return f"{lane.provider}:{lane.upstream_model}"


def events_stream() -> str:
    return settings.GATEWAY["BREAKER_STREAM"]


_key_cache: dict[tuple, dict[str, str]] = {}


def _keys(lane: LaneSpec) -> dict[str, str]:
    identity = (lane.provider, lane.base_url, lane.upstream_model, lane.api_key_env)
    keys = _key_cache.get(identity)
    if keys is None:
        base = f"gw:lane:{{{lane_id(lane)}}}"
        keys = {"hold": f"{base}:hold", "breaker": f"{base}:br", "rpm": f"{base}:rpm", "tpm": f"{base}:tpm",
                "label": lane_label(lane)}
        if len(_key_cache) > 10_000:
            _key_cache.clear()
        _key_cache[identity] = keys
    return keys


@dataclass(slots=True)
class Ticket:
    lane: LaneSpec
    policy: LanePolicy
    probe: bool = False


@dataclass(slots=True)
class Unavailable:
    lane: LaneSpec
    reason: str
    retry_after_ms: int

    @property
    def text(self) -> str:
        return f"{lane_label(self.lane)}: {REASONS.get(self.reason, self.reason)}"


def acquire_call(lane: LaneSpec, tokens: int) -> ScriptCall:
    policy = policy_for(lane)
    keys = _keys(lane)
    return ACQUIRE.call([keys["hold"], keys["breaker"], events_stream(), keys["rpm"], keys["tpm"]],
                        [int(policy.breaker.cooldown_s * 1000), policy.breaker.probes, policy.limits.rpm,
                         policy.limits.tpm, tokens, keys["label"]])


async def acquire(lane: LaneSpec, tokens: int) -> Ticket | Unavailable:
    try:
        (result,) = await run_scripts([acquire_call(lane, tokens)])
    except (redis.exceptions.RedisError, OSError) as exc:
        result = exc
    ticket = ticket_from(lane, result)
    note_ticket(ticket)
    return ticket


def ticket_from(lane: LaneSpec, result) -> Ticket | Unavailable:
    policy = policy_for(lane)
    if isinstance(result, Exception):
        log.warning("lane health unavailable; calling the lane anyway", extra={"lane": lane_label(lane)})
        return Ticket(lane, policy)
    if result[0] == 1:
        return Ticket(lane, policy, probe=bool(result[1]))
    reason = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
    return Unavailable(lane, reason, int(result[2]))


def outcome_of(exc: BaseException | None, latency_ms: float, policy: LanePolicy) -> tuple[str, str]:
    """(outcome, detail) for the breaker: provider faults count, client mistakes do not."""
    if exc is None:
        if policy.breaker.slow_ms and latency_ms > policy.breaker.slow_ms:
            return "slow", f"{latency_ms:.0f} ms > {policy.breaker.slow_ms} ms"
        return "ok", ""
    if isinstance(exc, UpstreamError):
        if exc.upstream_status == 429:
            return "limited", "429"
        if exc.status == 504:
            return "timeout", exc.code or "timeout"
        if exc.status >= 500 or exc.upstream_status in (401, 403, 404):
            return "error", exc.code or str(exc.status)
        return "ok", ""  # the provider answered; the request itself was refused
    return "error", type(exc).__name__


def report_call(ticket: Ticket, outcome: str, detail: str, hold_ms: int = 0, count: int = 1) -> ScriptCall:
    b = ticket.policy.breaker
    keys = _keys(ticket.lane)
    return REPORT.call([keys["breaker"], keys["hold"], events_stream()],
                       [outcome, int(ticket.probe), hold_ms, b.error_rate, b.min_calls, b.window_s,
                        int(b.cooldown_s * 1000), b.close_after, keys["label"], detail[:200], count])


# -- the healthy fast path ------------------------------------------------------------------
# A lane seen closed and unheld is trusted for HEALTHY_FOR_S without asking Redis again, and its
# successes are counted here and sent once a second. Failures, probes, holds and lanes with an
# upstream budget always go to Redis at once, so every process still learns of trouble within
# HEALTHY_FOR_S.
HEALTHY_FOR_S = 0.25
FLUSH_EVERY_S = 1.0
_healthy: dict[str, float] = {}
_successes: dict[str, tuple[Ticket, int]] = {}
_flusher = None


def trusted_ticket(lane: LaneSpec) -> Ticket | None:
    policy = policy_for(lane)
    if policy.limits.rpm or policy.limits.tpm:
        return None
    if _healthy.get(_keys(lane)["breaker"], 0.0) > time.monotonic():
        return Ticket(lane, policy)
    return None


def note_ticket(ticket: Ticket | Unavailable) -> None:
    if isinstance(ticket, Ticket) and not ticket.probe:
        _healthy[_keys(ticket.lane)["breaker"]] = time.monotonic() + HEALTHY_FOR_S
    else:
        _healthy.pop(_keys(ticket.lane)["breaker"], None)


def note_failure(lane: LaneSpec) -> None:
    _healthy.pop(_keys(lane)["breaker"], None)


def count_success(ticket: Ticket) -> None:
    """A success on a closed breaker: counted locally, sent with the next flush."""
    global _flusher
    key = _keys(ticket.lane)["breaker"]
    previous = _successes.get(key)
    _successes[key] = (ticket, (previous[1] if previous else 0) + 1)
    if _flusher is None or _flusher.done():
        _flusher = asyncio.ensure_future(_flush_successes())


async def _flush_successes(wait: bool = True) -> None:
    if wait:
        await asyncio.sleep(FLUSH_EVERY_S)
    batch = list(_successes.values())
    _successes.clear()
    if batch:
        await run_reports([report_call(ticket, "ok_batch", "", 0, count) for ticket, count in batch])


async def report(ticket: Ticket, outcome: str, detail: str, hold_ms: int = 0) -> None:
    await run_reports([report_call(ticket, outcome, detail, hold_ms)])


async def run_reports(calls: list[ScriptCall]) -> None:
    try:
        await run_scripts(calls, defer=True)
    except (redis.exceptions.RedisError, OSError):
        log.warning("could not report lane health", extra={"lanes": len(calls)})


def backoff_s(attempt: int, policy: LanePolicy, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never sooner than the provider asked."""
    ceiling = min(policy.retry.cap_ms, policy.retry.base_ms * (2 ** attempt)) / 1000
    return max(random.uniform(0, ceiling), retry_after or 0.0)


async def flush_successes_now() -> None:
    """Shutdown: send the successes counted since the last flush."""
    await _flush_successes(wait=False)
