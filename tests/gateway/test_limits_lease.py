"""Leases: far from every limit, a process takes room for several requests at once and admits
them without a round trip; nothing is ever admitted beyond a limit, and what a lease holds
comes back to Redis when it is idle, old, replaced or the process shuts down."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from decimal import Decimal

import pytest

from gateway import limits
from gateway.errors import GatewayError
from llm_platform import resp
from llm_platform.redis import get_redis
from tenants.principal import Principal

from .test_limits_batch import calls  # noqa: F401 - a fixture

BIG = {"requests_per_minute": 100_000, "requests_per_hour": None, "tokens_per_minute": None, "max_concurrent": None,
       "daily_budget_usd": None, "monthly_budget_usd": None}


def principal(tenants, **tier) -> Principal:
    _, key, _ = tenants.make(tier=BIG | tier)
    return Principal.from_key(key)


async def admit(who: Principal, tokens: int = 100, estimate: int = 1000) -> limits.Admission:
    """One admission, from a lease or through Redis; a refusal raises GatewayError."""
    admission, operation = limits.prepare_admission(who, f"req-{uuid.uuid4().hex}", tokens, estimate)
    if operation is None:
        return admission
    return limits.finish_admission(admission, await limits.submit(operation))


async def settle(admission: limits.Admission, used_tokens: int = 10, cost: str = "0.000001") -> None:
    if admission.lease is not None:
        limits.settle_locally(admission, used_tokens, Decimal(cost))
    else:
        await limits.submit(limits.settle_operation(admission, used_tokens, Decimal(cost)))


def scope(who: Principal) -> tuple[str, str]:
    prefix = limits.scope_prefix(who.tenant_id)
    return f"{prefix}:lim", f"{prefix}:conc"


def test_far_from_its_limits_a_process_admits_most_requests_without_a_round_trip(tenants, calls):  # noqa: F811
    who = principal(tenants)

    async def scenario():
        remaining = []
        started = time.monotonic()
        for _ in range(200):
            admission = await admit(who)
            remaining.append(int(admission.headers["x-ratelimit-remaining-requests"]))
            await asyncio.sleep(0)  # the request's own I/O: the loop runs (and reads Redis's replies)
            await settle(admission)
        return remaining, (time.monotonic() - started) * 1000 * 100_000 / 60_000

    remaining, refill = asyncio.run(scenario())
    # Each lease serves three quarters of its 128 requests before the next is asked for (one
    # call each; the one it replaces is given back with the next call or when idle); without
    # leases: 200 admissions, and settlements riding along with them or alone.
    assert len(calls) <= 6, len(calls)
    # The headers count every request, those admitted from a lease too: one fewer each time,
    # less what the bucket refilled (1.67 a millisecond), which shows when a new lease comes.
    steps = [a - b for a, b in zip(remaining, remaining[1:], strict=False)]
    assert all(step <= 1 for step in steps), [(i, step) for i, step in enumerate(steps) if step != 1]
    assert 199 - refill - 1 <= sum(steps) <= 199, (sum(steps), refill)


def test_leases_are_not_taken_near_a_limit_nor_when_turned_off(tenants, calls, settings):  # noqa: F811
    small = principal(tenants, requests_per_minute=200)  # below 64 x 4: every request is a round trip
    near = principal(tenants, requests_per_minute=1000)

    async def scenario():
        for _ in range(5):
            await settle(await admit(small))
        used_small = len(calls)
        for _ in range(520):  # a lease only while the bucket keeps half of it: then every request
            await admit(near)
        before = len(calls)
        for _ in range(20):
            assert (await admit(near)).lease is None
        return used_small, len(calls) - before

    used_small, near_calls = asyncio.run(scenario())
    assert used_small >= 5 and near_calls == 20

    settings.GATEWAY = {**settings.GATEWAY, "LEASE_UNITS": 0}
    off = principal(tenants)
    calls.clear()

    async def unleased():
        return [(await admit(off)).lease for _ in range(10)]

    assert asyncio.run(unleased()) == [None] * 10 and len(calls) == 10


def test_two_processes_with_leases_never_admit_beyond_the_limit_and_lose_no_room(tenants):
    """Two event loops (each with its own Redis connection and leases, as two processes have)
    send a burst of 3N requests between them against N requests per minute; then each gives
    its leases back, and a last sequential run takes what is left: N in all, plus what the
    bucket refilled meanwhile, never more."""
    n = 2048
    who = principal(tenants, requests_per_minute=n)
    admitted = [0, 0]
    started = time.monotonic()

    def process(i: int) -> None:
        async def run():
            async def one():
                try:
                    admission = await admit(who)
                except GatewayError:
                    return
                admitted[i] += 1
                await asyncio.sleep(0)
                await settle(admission)

            for _ in range(3 * n // 2 // 16):
                await asyncio.gather(*(one() for _ in range(16)))
            await limits.give_back_leases()

        asyncio.run(run())

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    burst = sum(admitted)

    async def rest() -> int:
        more = 0
        while True:
            try:
                admission = await admit(who)
            except GatewayError:
                return more
            assert admission.lease is None  # far below half of the limit: no lease any more
            more += 1

    more = asyncio.run(rest())
    elapsed_ms = (time.monotonic() - started) * 1000
    refill = n / 60_000 * elapsed_ms
    assert admitted[0] > 0 and admitted[1] > 0
    assert burst <= n + refill
    assert n <= burst + more <= n + refill + 1, (burst, more, refill)


def test_a_lease_settles_real_spend_into_the_budget_and_its_overshoot_raises_the_alert(tenants):
    from billing.models import BudgetAlert
    from billing.writer import drain_alerts

    who = principal(tenants, daily_budget_usd="1.00", max_concurrent=1000)
    hash_key, slot_key = scope(who)

    async def scenario():
        first = await admit(who, estimate=1000)  # through Redis, taking a lease
        second = await admit(who, estimate=1000)  # from that lease
        assert first.lease is None and second.lease is not None
        members = get_redis().zrange(slot_key, 0, -1)
        assert len(members) == 1 + second.lease.slots  # the first's slot, and the lease's
        await settle(first, cost="0.10")
        await settle(second, cost="0.75")  # far beyond its estimate: charged, not refused
        await limits.give_back_leases()

    asyncio.run(scenario())
    redis = get_redis()
    assert int(redis.hget(hash_key, "d")) == 850_000_000  # exactly what the two cost
    assert redis.zcard(slot_key) == 0  # every slot back, the lease's too
    drain_alerts()
    assert list(BudgetAlert.objects.filter(tenant_id=who.tenant_id).values_list("threshold", flat=True)) == [80]


def test_an_idle_lease_goes_back_by_itself(tenants, settings):
    settings.GATEWAY = {**settings.GATEWAY, "LEASE_SECONDS": 0.5}  # idle for a tenth of that: given back
    who = principal(tenants, requests_per_hour=100_000, max_concurrent=1000)
    hash_key, slot_key = scope(who)

    async def scenario():
        for _ in range(3):
            await settle(await admit(who))
        held = get_redis().zcard(slot_key)
        rph_held = float(get_redis().hget(hash_key, "rph"))
        await asyncio.sleep(0.3)
        return held, rph_held

    held, rph_held = asyncio.run(scenario())
    redis = get_redis()
    assert held > 0 and redis.zcard(slot_key) == 0
    # requests per hour barely refill (28 a second): after the lease came back, three are used
    assert rph_held < 100_000 - 3 - 50 and 100_000 - 3 <= float(redis.hget(hash_key, "rph")) <= 100_000 - 3 + 15


def test_a_request_that_does_not_fit_the_lease_goes_to_redis_and_the_lease_is_replaced(tenants, calls):  # noqa: F811
    who = principal(tenants, tokens_per_minute=10_000_000)

    async def scenario():
        small = [await admit(who, tokens=100) for _ in range(3)]
        lease = small[1].lease
        big = await admit(who, tokens=14_000)  # more than the lease holds (128 x 100 tokens)
        assert lease is not None and lease.closing and big.lease is None
        for admission in small + [big]:
            await settle(admission)
        nxt = await admit(who, tokens=14_000)  # from the lease the big one took (11 such: 1/64 of the bucket)
        assert nxt.lease is not None and nxt.lease is not lease
        await settle(nxt)
        await limits.give_back_leases()

    asyncio.run(scenario())


def test_the_heartbeat_keeps_a_leases_slots_alive(tenants, settings):
    settings.GATEWAY = {**settings.GATEWAY, "SLOT_TTL_SECONDS": 30.0}
    who = principal(tenants, max_concurrent=1000)
    _, slot_key = scope(who)

    async def scenario():
        await admit(who)
        admission = await admit(who)
        before = dict(get_redis().zrange(slot_key, 0, -1, withscores=True))
        await asyncio.sleep(0.05)
        await limits.refresh_slots([admission, admission])
        after = dict(get_redis().zrange(slot_key, 0, -1, withscores=True))
        return admission.lease, before, after

    lease, before, after = asyncio.run(scenario())
    members = {m.encode() for m in lease.members()}
    assert members <= set(before) and len(members) == lease.slots
    assert all(after[m] > before[m] for m in members)  # pushed forward
    now_ms = time.time() * 1000
    assert all(now_ms < after[m] <= now_ms + 30_000 for m in members)  # and still expiring


@pytest.fixture(autouse=True)
def _fresh_clients():
    """Each test's loops get their own Redis clients and batchers."""
    yield
    resp._clients.clear()
    limits.batching._batchers.clear()
