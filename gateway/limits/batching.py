"""The batcher: the operations one event loop issues go to Redis as one call of lua/limits.lua
(group commit, at most one call in flight), and each reply goes back to its waiter."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis.exceptions as rx
from django.conf import settings

from llm_platform.resp import Rider, get_resp, raise_errors

from . import wire
from .leases import Lease, _lease_id
from .wire import LIMITS, MAX_CALL_OPERATIONS, Operation, _call, _deliver, _Queued

if TYPE_CHECKING:
    from .admission import Admission
    from .policy import _Plan

log = logging.getLogger(__name__)


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
           abandoned: Callable[[dict], None] | None = None, at_once: bool = False,
           rider: Rider | None = None) -> asyncio.Future:
    """Queue an operation for this loop's next call of lua/limits.lua; its reply as a future
    (a Redis failure as its exception). `defer`: it may wait up to GW_REDIS_DEFER_MS (or, a
    number, that many seconds) for an admission to ride with (settlements and leases given
    back: no client waits for them). `at_once`: it is written
    to Redis before this returns, with whatever else is queued, even while a call is in
    flight. `abandoned(reply)` is called with the reply when the future was cancelled before
    it came (its caller is gone, but Redis ran the operation).

    `rider`: a packed command (`billing.recorder.rider`: the request's usage row) written
    right after the call that carries this operation, in the same write; it is handed its own
    reply or the write's failure, and is never sent twice."""
    batcher = _batcher()
    waiter = batcher.submit(operation, defer, abandoned)
    if rider is not None:
        batcher.riders.append(rider)
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


class _Batcher:
    """One event loop's operations not yet sent; settlements go first in a call, so that the
    slots and tokens they free serve the admissions after them.

    At most one call is in flight: admissions that arrive meanwhile go out together when its
    reply comes back (group commit). An idle process sends an admission at the end of the loop
    iteration, as before; a busy one sends one call per round trip instead of one per request,
    which is where Redis and the platform spend their time (the write, the wake-up, the read)."""

    __slots__ = ("loop", "settles", "admits", "soon", "later", "later_at", "inflight", "overdue", "known", "leases",
                 "leasing", "returning", "riders")

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
        self.riders: list[Rider] = []  # commands for the next call's write

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

        def came(reply: asyncio.Future) -> None:  # a failure: the next request that does not fit asks again
            failed = reply.cancelled() or reply.exception() is not None
            self.lease_came(plan, lease_id, tokens, estimate, None if failed else reply.result())

        self.submit(wire.lease(plan, lease_id, tokens, estimate, want, slots), False, None).add_done_callback(came)
        return True

    def lease_came(self, plan: _Plan, lease_id: str, tokens: int, estimate: int, reply) -> None:
        """The reply of an operation that asked for a lease ('L' or 'l'; an exception or None if
        it failed): `lease` and `lease_slots` say what was granted. A lease granted replaces the
        plan's current one, whose unused room its headers count in."""
        self.leasing.pop(id(plan), None)
        if reply is None or isinstance(reply, BaseException) or not reply["ok"] or reply["lease"] <= 0:
            return
        lease = Lease(self, plan, lease_id, reply["lease"], reply["lease_slots"], tokens, estimate, reply)
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
        riders, self.settles, self.admits, self.riders = self.riders, [], [], []
        for start in range(0, len(queued), MAX_CALL_OPERATIONS):  # a burst must not hold Redis long
            self.send(queued[start:start + MAX_CALL_OPERATIONS], riders=riders if start == 0 else ())

    def send(self, batch: list[_Queued], spelled_out: bool = False, riders: Sequence[Rider] = ()) -> None:
        """`spelled_out`: every plan in full (Redis said NOPLAN to the call by names). `riders`:
        written after the call, in the same write (never again: not when the call is resent)."""
        try:
            self.write(_call(batch, self.known, spelled_out), _Call(self, batch, spelled_out), riders)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
            for rider in riders:  # a rider handed its outcome already ignores this one
                rider.set_exception(exc)
            _deliver(batch, exc)
            return
        self.inflight += 1  # its reply comes in a later iteration

    def write(self, data: bytes, sink: _Call, riders: Sequence[Rider]) -> None:
        """One call of lua/limits.lua, and its riders, to Redis."""
        get_resp().call_now(LIMITS, data, sink, riders)

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
