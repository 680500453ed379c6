"""Leases: room for a few more requests like one admitted far from every limit, taken from every
limit at once, which this process then admits by itself without a round trip.

Switched off with GW_LIMITS_LEASE_UNITS=0: every request then goes to Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING

from django.conf import settings

from . import wire
from .policy import _headers

if TYPE_CHECKING:
    from .admission import Admission
    from .batching import _Batcher
    from .policy import _Plan

log = logging.getLogger(__name__)

# A lease's slots: this many for a plan's first lease, then twice the requests in flight from the
# one it replaces, plus this.
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
                 estimate: int, reply: dict):
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
        for tag, bucket in self.plan.header_buckets:
            remaining = values[tag][0] - (used_tokens if bucket.header == "tokens" else used_requests)
            values[tag] = (remaining, math.ceil((bucket.limit - remaining) / bucket.rate_per_ms))
        return _headers(self.plan.header_kinds, values)

    def count_in(self, old: Lease) -> None:
        """Its headers also count what `old`, which it replaces, has not used: that goes back
        to the buckets, which its own snapshot, taken while `old` held it, did not show."""
        snapshot = self.snapshot.copy()
        for tag, bucket in self.plan.header_buckets:
            remaining, reset = snapshot[tag]
            snapshot[tag] = (remaining + (old.tokens if bucket.header == "tokens" else old.requests), reset)
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
        operation = wire.give_back(self.plan, self.lease_id, self.slots, self.requests, self.tokens, self.nano)
        # It rides with the next call (the next lease's, say), or goes alone once idle long enough.
        done = self.batcher.submit(operation, self.idle_s, None)
        self.batcher.returning[self] = done
        done.add_done_callback(self._returned)

    def _returned(self, done: asyncio.Future) -> None:
        self.batcher.returning.pop(self, None)
        if done.cancelled() or done.exception() is not None:
            log.warning("could not give a lease back; its room returns as the limits refill and its slots expire",
                        extra={"lease_id": self.lease_id})

