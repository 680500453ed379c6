"""Per-tenant and per-key limits, enforced atomically in Redis for every process at once.

Admission checks, then reserves: token buckets for requests/min, requests/hour and tokens/min
(bursts up to the bucket, the average enforced), concurrency slots (a sorted set of request ids
scored by expiry, so a dead worker's slot frees itself), and daily/monthly spend. Settlement
refunds unused reserved tokens (or charges an overshoot), releases the slot, settles spend from
the real cost and raises 80%/100% budget alerts once per period.

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
GW_LIMITS_LEASE_UNITS=0 switches leases off.

One reason to change per module:
  policy     what limits a principal has, and what a request costs against them (plans, refusals)
  admission  one request's admission and settlement (`Admission`)
  leases     the room a process admits from by itself (`Lease`)
  batching   one event loop's operations, one script call at a time (`submit`)
  wire       the script's arguments and replies (documented in lua/limits.lua)
  spend_floor  `restore_spend`: budgets' running totals raised back to PostgreSQL's after Redis lost them
"""

from .admission import (
    Admission,
    finish_admission,
    prepare_admission,
    settle_locally,
    settle_operation,
)
from .batching import give_back_leases, refresh_slots, submit
from .leases import Lease
from .policy import estimate_nano, reset_text, scope_prefix, unavailable
from .wire import LIMITS, MAX_CALL_OPERATIONS, Operation

__all__ = [
    "LIMITS", "MAX_CALL_OPERATIONS", "Admission", "Lease", "Operation", "estimate_nano", "finish_admission",
    "give_back_leases", "prepare_admission", "refresh_slots", "reset_text", "scope_prefix", "settle_locally",
    "settle_operation", "submit", "unavailable",
]
