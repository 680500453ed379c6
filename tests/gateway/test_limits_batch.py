"""Operations issued in one event-loop iteration go to Redis as one call of lua/limits.lua, and
each sees the effects of those before it, as if they had been sent one by one."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import socket
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest
import redis.exceptions
from django.conf import settings

from billing.periods import nano
from billing.recorder import rider
from gateway import limits
from gateway.errors import GatewayError
from llm_platform.redis import get_redis
from tenants.principal import Principal
from tests.support.rows import usage_row


@pytest.fixture()
def calls(monkeypatch):
    """How many calls of the script were written to Redis."""
    seen: list[int] = []
    real = limits.batching._Batcher.write

    def counting(self, data, sink, riders):
        seen.append(1)
        return real(self, data, sink, riders)

    monkeypatch.setattr(limits.batching._Batcher, "write", counting)
    return seen


def principal(tenants, **tier) -> Principal:
    _, key, _ = tenants.make(tier=tier)
    return Principal.from_key(key)


def outcome(admission, reply):
    try:
        return limits.finish_admission(admission, reply)
    except GatewayError as refusal:
        return refusal


async def admit_together(who: Principal, tokens: list[int]) -> list:
    """Admissions submitted in one loop iteration; each one's Admission or refusal."""
    prepared = [limits.prepare_admission(who, f"req-{uuid.uuid4().hex}", n, 1000) for n in tokens]
    waiters = [limits.submit(operation) for _, operation in prepared]
    replies = await asyncio.gather(*waiters, return_exceptions=True)
    return [outcome(admission, reply) for (admission, _), reply in zip(prepared, replies, strict=True)]


def test_admissions_in_one_call_each_see_the_ones_before(tenants, calls):
    who = principal(tenants, requests_per_minute=3)
    results = asyncio.run(admit_together(who, [1] * 5))
    assert len(calls) == 1
    admitted = [r for r in results if isinstance(r, limits.Admission)]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in admitted] == ["2", "1", "0"]
    refused = results[3:]
    assert all(isinstance(r, GatewayError) and r.status == 429 for r in refused)
    assert all("requests per minute" in r.message for r in refused)


def test_a_burst_is_split_into_calls_of_bounded_size(tenants, calls):
    who = principal(tenants, requests_per_minute=100, max_concurrent=1000)
    results = asyncio.run(admit_together(who, [1] * (2 * limits.MAX_CALL_OPERATIONS + 5)))
    assert len(calls) == 3
    admitted = [r for r in results if isinstance(r, limits.Admission)]
    assert len(admitted) == 100  # exactly the bucket, across the three calls
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted) == list(range(100))


def test_a_refusal_amid_a_call_leaves_the_others_alone(tenants, calls):
    who = principal(tenants, tokens_per_minute=100)
    results = asyncio.run(admit_together(who, [60, 60, 30]))
    assert len(calls) == 1
    assert [type(r).__name__ for r in results] == ["Admission", "GatewayError", "Admission"]
    assert results[1].status == 429 and "tokens per minute" in results[1].message
    level = float(get_redis().hget(f"gw:{{t{who.tenant_id}}}:lim", "tpm"))
    assert 10 <= level < 11  # 100 - 60 - 30, plus what refilled in the meantime


def test_admissions_arriving_while_a_call_is_in_flight_go_out_together_after_it(tenants, calls):
    who = principal(tenants, requests_per_minute=4)

    async def scenario():
        prepared = [limits.prepare_admission(who, f"req-{uuid.uuid4().hex}", 1, 0) for _ in range(5)]
        first = limits.submit(prepared[0][1])
        await asyncio.sleep(0)  # the end of the loop iteration: the first call is written
        assert len(calls) == 1 and not first.done()
        rest = [limits.submit(operation) for _, operation in prepared[1:]]  # held while it is in flight
        await asyncio.sleep(0)
        assert len(calls) == 1
        replies = await asyncio.gather(first, *rest)
        return [outcome(admission, reply) for (admission, _), reply in zip(prepared, replies, strict=True)]

    results = asyncio.run(scenario())
    assert len(calls) == 2  # the four held admissions in one call
    assert [r.headers["x-ratelimit-remaining-requests"] for r in results[:4]] == ["3", "2", "1", "0"]
    assert isinstance(results[4], GatewayError) and results[4].status == 429


def test_admissions_arriving_just_after_a_reply_join_the_held_ones(tenants, calls):
    """The admissions held behind a call go out a few loop iterations after its reply, with
    those that arrive meanwhile: one call for both, not one each."""
    who = principal(tenants, requests_per_minute=10)

    def submitted():
        _, operation = limits.prepare_admission(who, f"req-{uuid.uuid4().hex}", 1, 0)
        return limits.submit(operation)

    async def scenario():
        first = submitted()
        await asyncio.sleep(0)  # written: in flight
        held = submitted()  # waits for its reply
        await first
        await asyncio.sleep(0)  # an iteration after the reply was handed out
        late = submitted()
        return await held, await late

    held, late = asyncio.run(scenario())
    assert held["ok"] == 1 and late["ok"] == 1
    assert len(calls) == 2


def test_settlements_due_while_a_call_is_in_flight_wait_for_its_reply(tenants, monkeypatch):
    who = principal(tenants, requests_per_minute=10)
    monkeypatch.setitem(settings.GATEWAY, "REDIS_DEFER_MS", 0.0)  # due at the next iteration
    in_flight_at_each_call: list[int] = []
    real = limits.batching._Batcher.write

    def noting(self, data, sink, riders):
        in_flight_at_each_call.append(self.inflight)
        return real(self, data, sink, riders)

    monkeypatch.setattr(limits.batching._Batcher, "write", noting)

    async def scenario():
        (first,) = await admit_together(who, [1])
        admission, operation = limits.prepare_admission(who, f"req-{uuid.uuid4().hex}", 1, 0)
        admitted = limits.submit(operation)
        await asyncio.sleep(0)  # the admission's call is written and in flight
        settled = limits.submit(limits.settle_operation(first, 1, Decimal(0)), defer=True)
        return await settled, await admitted

    alerts, reply = asyncio.run(scenario())
    assert alerts == {"alerts": 0} and reply["ok"] == 1
    assert in_flight_at_each_call == [0, 0, 0]  # the settlement went after the reply, not alongside


def test_an_operation_that_fails_in_redis_fails_alone(tenants, calls):
    broken, healthy = principal(tenants, requests_per_minute=10), principal(tenants, requests_per_minute=10)
    get_redis().set(f"gw:{{t{broken.tenant_id}}}:lim", "not a hash")  # what a stray write would leave

    async def scenario():
        prepared = [limits.prepare_admission(who, f"req-{uuid.uuid4().hex}", 1, 0) for who in (healthy, broken, healthy)]
        replies = await asyncio.gather(*(limits.submit(op) for _, op in prepared), return_exceptions=True)
        return [outcome(admission, reply) for (admission, _), reply in zip(prepared, replies, strict=True)]

    first, failed, second = asyncio.run(scenario())
    assert len(calls) == 1
    assert isinstance(failed, GatewayError) and failed.status == 503
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == ["9", "8"]
    assert get_redis().hget(f"gw:{{t{healthy.tenant_id}}}:lim", "rpm") is not None  # the others' state was written


def test_a_settlement_frees_its_slot_for_an_admission_in_the_same_call(tenants, calls):
    who = principal(tenants, max_concurrent=1, daily_budget_usd=Decimal("5"))

    async def scenario():
        (first,) = await admit_together(who, [10])
        assert isinstance(first, limits.Admission)
        (blocked,) = await admit_together(who, [10])
        assert isinstance(blocked, GatewayError) and "concurrent requests" in blocked.message
        settled = limits.submit(limits.settle_operation(first, 4, Decimal("0.000002")), defer=True)
        (second,) = await admit_together(who, [10])  # submitted in the same iteration as the settlement
        return await settled, second

    alerts, second = asyncio.run(scenario())
    assert alerts == {"alerts": 0}
    assert isinstance(second, limits.Admission)
    assert len(calls) == 3  # first, blocked, then the settlement riding with the second admission
    slots = [m.decode() for m in get_redis().zrange(f"gw:{{t{who.tenant_id}}}:conc", 0, -1)]
    assert slots == [second.request_id]
    spent = int(get_redis().hget(f"gw:{{t{who.tenant_id}}}:lim", "d"))
    assert spent == 2000 + 1000  # the first settled at its real cost, the second's estimate reserved


def test_a_settlement_alone_is_sent_after_the_deferral(tenants, calls):
    who = principal(tenants, requests_per_minute=10)

    async def scenario():
        (first,) = await admit_together(who, [1])
        row = usage_row(request_id=first.request_id, tenant_id=who.tenant_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await limits.submit(limits.settle_operation(first, 1, Decimal(0)), defer=True, rider=rider(row))
        return loop.time() - started, first.request_id

    waited, request_id = asyncio.run(scenario())
    assert settings.GATEWAY["REDIS_DEFER_MS"] / 1000 * 0.9 <= waited < 1.0
    assert len(calls) == 2
    rows = [json.loads(fields[b"row"]) for _, fields in get_redis().xrange(settings.GATEWAY["USAGE_STREAM"])]
    assert [r["request_id"] for r in rows].count(request_id) == 1


def test_operations_deferred_for_different_times_go_at_the_soonest_under_uvloop(tenants):
    """uvloop answers a delay under half a millisecond with a plain Handle (no when()): a
    settlement deferred behind one must still be queued, not fail."""
    import uvloop

    who = principal(tenants, requests_per_minute=100)

    async def scenario():
        first, second = await admit_together(who, [1, 1])
        soon = limits.submit(limits.settle_operation(first, 1, Decimal("0.000001")), defer=0.0001)
        later = limits.submit(limits.settle_operation(second, 1, Decimal("0.000001")), defer=True)
        return await asyncio.wait_for(asyncio.gather(soon, later), 2)

    assert uvloop.run(scenario()) == [{"alerts": 0}] * 2  # both settled (no budget alerts)


def test_when_redis_is_away_every_operation_of_the_call_fails_as_unavailable(tenants, monkeypatch):
    who = principal(tenants, requests_per_minute=10)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the block ends
    monkeypatch.setattr(settings, "REDIS_URL", f"redis://127.0.0.1:{port}/0")

    async def scenario():
        prepared = [limits.prepare_admission(who, f"req-{i}", 1, 0) for i in range(3)]
        return await asyncio.gather(*(limits.submit(op) for _, op in prepared), return_exceptions=True)

    failures = asyncio.run(scenario())
    assert all(isinstance(f, redis.exceptions.ConnectionError) for f in failures)
    assert len({id(f) for f in failures}) == 3  # one exception each, not one shared
    admission, _ = limits.prepare_admission(who, "req-x", 1, 0)
    with pytest.raises(GatewayError) as caught:
        limits.finish_admission(admission, failures[0])
    assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "2"


@pytest.mark.parametrize("price_in, price_out", [("0.15", "0.6"), ("2.5", "10"), ("0.075", "0.3"),
                                                 ("0.0375", "0.15"), ("0", "0"), ("3.0000001", "15")])
def test_the_reservation_estimate_is_the_exact_cost_rounded_up(price_in, price_out):
    lane = SimpleNamespace(price_input=Decimal(price_in), price_output=Decimal(price_out))
    for prompt, completion in [(0, 0), (1, 1), (12, 300), (123_457, 4096)]:
        exact = (prompt * Decimal(price_in) + completion * Decimal(price_out)) / 1_000_000 * 1_000_000_000
        assert limits.estimate_nano(lane, prompt, completion) == math.ceil(exact)


def test_a_caller_cancelled_during_admission_gives_back_what_it_reserved(routes, tenants, monkeypatch):
    from gateway import routing
    from gateway.api.validation import validate_chat
    from gateway.chat import call as service

    who = principal(tenants, max_concurrent=1, tokens_per_minute=10_000, daily_budget_usd=Decimal("5"))
    # The route table read here, in this thread (not in an executor thread of the loop below).
    monkeypatch.setattr(routing.routes, "_table", routing.load_table())
    monkeypatch.setattr(routing.routes, "_expires", time.monotonic() + 60)
    real_flush = limits.batching._Batcher.flush

    def late_flush(self):  # the call leaves a moment later: time for the client to hang up
        self.loop.call_later(0.1, real_flush, self)

    async def scenario():
        monkeypatch.setattr(limits.batching._Batcher, "flush", late_flush)
        req = validate_chat({"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
        ctx = service.CallContext(request_id=f"req-{uuid.uuid4().hex}")

        async def client():
            async with service.open_call(who, req, ctx):
                raise AssertionError("admitted while cancelled")

        task = asyncio.ensure_future(client())
        await asyncio.sleep(0.02)  # the admission is queued, not yet answered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(limits.batching._Batcher, "flush", real_flush)
        await asyncio.sleep(0.3)  # Redis admits it; the reservation is given back
        await asyncio.gather(*service._settling)
        return ctx.request_id

    request_id = asyncio.run(scenario())
    r = get_redis()
    assert r.zcard(f"gw:{{t{who.tenant_id}}}:conc") == 0  # the slot is free again
    state = {k.decode(): v.decode() for k, v in r.hgetall(f"gw:{{t{who.tenant_id}}}:lim").items()}
    assert float(state["tpm"]) >= 10_000 - 1  # every reserved token back (plus refill)
    assert int(state["d"]) == 0  # the estimated spend too
    rows = [json.loads(f[b"row"]) for _, f in r.xrange(settings.GATEWAY["USAGE_STREAM"])]
    (row,) = [row for row in rows if row["request_id"] == request_id]
    assert (row["http_status"], row["error_code"], row["prompt_tokens"], row["completion_tokens"]) == (
        499, "client_disconnected", 0, 0)


def test_each_keys_cap_alerts_once_per_period_and_so_does_the_tenants(tenants):
    from billing.models import BudgetAlert
    from billing.writer import drain_alerts
    from tenants.models import ApiKey

    tenant, key, _ = tenants.make(tier={"daily_budget_usd": "0.20", "monthly_budget_usd": None})
    other, _ = ApiKey.issue(tenant)
    for k in (key, other):
        k.daily_budget_usd = Decimal("0.10")
        k.save()
    whos = [Principal.from_key(ApiKey.objects.get(pk=k.pk)) for k in (key, other)]

    async def spend(who: Principal, cost: str) -> int:
        """Admit and settle one request that cost `cost`; the budget alerts its settlement raised."""
        (admission,) = await admit_together(who, [1])
        return (await limits.submit(limits.settle_operation(admission, 1, Decimal(cost))))["alerts"]

    # Each key spends 85% of its own cap, so each crosses 80% of it; the second also takes the
    # tenant's day to 85% of the tenant's cap.
    assert asyncio.run(spend(whos[0], "0.085")) == 1
    assert asyncio.run(spend(whos[1], "0.085")) == 2
    assert asyncio.run(spend(whos[1], "0.001")) == 0  # crossed already this period
    drain_alerts()
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    alerts = set(BudgetAlert.objects.filter(tenant=tenant).values_list("scope", "api_key", "period", "threshold"))
    assert alerts == {("key", key.pk, day, 80), ("key", other.pk, day, 80), ("tenant", None, day, 80)}

    # A replayed alert (the writer retried after a crash) adds no row, for a key or the tenant.
    stream = settings.GATEWAY["ALERT_STREAM"]
    for scope, key_id in (("tenant", ""), ("key", str(other.pk))):
        get_redis().xadd(stream, {"tenant_id": tenant.pk, "scope": scope, "key_id": key_id, "period": day,
                                  "threshold": 80, "spent_nano": 1, "cap_nano": 1, "request_id": "replayed"})
    drain_alerts()
    assert BudgetAlert.objects.filter(tenant=tenant).count() == 3


def test_a_scope_hash_outlives_its_last_change_and_its_expiry_is_pushed_rarely(tenants):
    who = principal(tenants, requests_per_minute=60)
    key = f"gw:{{t{who.tenant_id}}}:lim"
    ttl = limits.policy._plan_for(who).scopes[0].ttl_ms  # the bucket's refill time + a minute
    redis_ = get_redis()

    def expiry() -> tuple[int, int]:
        return redis_.pttl(key), int(redis_.hget(key, "x"))

    asyncio.run(admit_together(who, [1]))
    left, noted = expiry()
    assert ttl < left <= 2 * ttl  # pushed to twice the ttl, so that many calls need not push it
    assert abs(noted - (time.time() * 1000 + left)) < 1000  # and noted in the hash
    asyncio.run(admit_together(who, [1]))
    assert expiry()[1] == noted  # more than the ttl left: not pushed again
    redis_.pexpire(key, ttl // 2)  # less than the ttl left (as x says): the next change pushes it
    redis_.hset(key, "x", int(time.time() * 1000) + ttl // 2)
    asyncio.run(admit_together(who, [1]))
    left, pushed = expiry()
    assert left > ttl and pushed > noted


def test_a_slot_set_outlives_its_newest_slot_and_its_expiry_is_pushed_rarely(tenants):
    who = principal(tenants, max_concurrent=5)
    key = f"gw:{{t{who.tenant_id}}}:conc"
    ttl = int(settings.GATEWAY["SLOT_TTL_SECONDS"] * 1000) + 60_000  # a slot's life + a minute
    redis_ = get_redis()

    asyncio.run(admit_together(who, [1]))
    assert ttl < redis_.pttl(key) <= 2 * ttl  # pushed to twice what it must outlive
    newest = max(score for _, score in redis_.zrange(key, 0, -1, withscores=True))
    assert redis_.pttl(key) > newest - time.time() * 1000  # the set outlives its newest slot
    redis_.pexpire(key, ttl + 30_000)  # more than ttl left: the next admission leaves it
    asyncio.run(admit_together(who, [1]))
    assert redis_.zcard(key) == 2 and ttl < redis_.pttl(key) <= ttl + 30_000
    redis_.pexpire(key, ttl // 2)  # less than ttl left: the next admission pushes it
    asyncio.run(admit_together(who, [1]))
    assert redis_.zcard(key) == 3 and redis_.pttl(key) > ttl


def test_two_plans_of_one_tenant_in_one_call_share_its_buckets(tenants, calls):
    """Two keys of one tenant are two plans in the call; the tenant's hash is still one state:
    each admission sees the others'. Two principal objects of one key (its cache filled twice,
    say) share one plan."""
    from tenants.models import ApiKey

    tenant, key, _ = tenants.make(tier={"requests_per_minute": 4})
    other, _ = ApiKey.issue(tenant)
    who, second = Principal.from_key(key), Principal.from_key(other)
    twin = Principal(**{f.name: getattr(who, f.name) for f in dataclasses.fields(who)})
    assert twin is not who and limits.policy._plan_for(twin) is limits.policy._plan_for(who)
    assert limits.policy._plan_for(second) is not limits.policy._plan_for(who)

    async def scenario():
        prepared = [limits.prepare_admission(p, f"req-{uuid.uuid4().hex}", 1, 0) for p in (who, second) * 3]
        replies = await asyncio.gather(*(limits.submit(operation) for _, operation in prepared))
        return [outcome(admission, reply) for (admission, _), reply in zip(prepared, replies, strict=True)]

    results = asyncio.run(scenario())
    assert len(calls) == 1
    assert [r.headers["x-ratelimit-remaining-requests"] for r in results[:4]] == ["3", "2", "1", "0"]
    assert all(isinstance(r, GatewayError) and r.status == 429 for r in results[4:])


def test_plans_go_by_name_once_redis_has_them_and_in_full_again_when_it_forgets(tenants, monkeypatch):
    """A call spells a plan out once, then names it; when Redis has lost the library (restart,
    flush) or its plans (loaded again), the call by name does nothing and goes again in full."""
    who = principal(tenants, requests_per_minute=10)
    spelled_out: list[bool] = []  # per call that reached the client: whether it carried the plan in full
    real = limits.batching._Batcher.write

    def noting(self, data, sink, riders):
        spelled_out.append(b"\r\ntenant\r\n" in data)
        return real(self, data, sink, riders)

    monkeypatch.setattr(limits.batching._Batcher, "write", noting)
    redis_ = get_redis()

    async def scenario():
        remaining = []
        for forget in (None, None, "library", None, "plans", None):
            if forget == "library":
                redis_.function_delete(limits.LIMITS.name)
            elif forget == "plans":
                redis_.function_load(limits.LIMITS.source, replace=True)
            (admission,) = await admit_together(who, [1])
            remaining.append(admission.headers["x-ratelimit-remaining-requests"])
        return remaining

    assert asyncio.run(scenario()) == ["9", "8", "7", "6", "5", "4"]  # each admitted once: no call ran twice
    # library lost: the call by name loads it (inside the client) and is refused NOPLAN, then goes in full
    assert spelled_out == [True, False, False, True, False, False, True, False]


def test_the_library_keeps_a_bounded_number_of_plans(tenants):
    """Past MAX_PLANS the library forgets every plan it kept (callers spell them out again)."""
    redis_ = get_redis()
    redis_.function_load(limits.LIMITS.source, replace=True)
    prefix = f"gw:{{test-{uuid.uuid4().hex[:8]}}}"
    keys = [f"{prefix}:lim", f"{prefix}:conc", f"{prefix}:alerts"]
    spec = [60000, 1, 1, 1, "tenant", 1, 0, 0, 120000, "rpm", 10, 0.001, 0]

    def call(name: str, full: bool, *operations):
        plan = [name, len(spec), *spec] if full else [name, 0]
        return redis_.fcall(limits.LIMITS.name, len(keys), *keys, 1, 100, 1000, *plan, *operations)

    pipe = redis_.pipeline(transaction=False)
    for i in range(10_000):  # the library's MAX_PLANS
        pipe.fcall(limits.LIMITS.name, len(keys), *keys, 1, 100, 1000, f"plan-{i}", len(spec), *spec)
    pipe.execute()

    def remaining(reply) -> int:  # an admission's tagged reply: admitted, and the rpm bucket's room
        assert reply[:3] == [b"ok", 1, b"t:rpm"]
        return reply[3][0]

    assert remaining(call("plan-0", False, "a", 1, "r1", 1, 0)[0]) == 9  # still kept: admitted, 9 left
    call("plan-10000", True)  # one more: the library lets the others go
    with pytest.raises(redis.exceptions.ResponseError, match="NOPLAN"):
        call("plan-0", False, "a", 1, "r2", 1, 0)
    assert remaining(call("plan-10000", False, "a", 1, "r3", 1, 0)[0]) == 8
    assert redis_.zcard(keys[1]) == 0  # the refused call did nothing (r3 found 8 left, not 7)
    redis_.delete(*keys)


def test_a_plan_names_the_new_budget_periods_from_utc_midnight(tenants, monkeypatch):
    """A principal's plan is kept between requests, but not past the UTC day it was made in:
    the first request after midnight (here also a new month) counts against the new periods."""
    who = principal(tenants, daily_budget_usd=Decimal("5"), monthly_budget_usd=Decimal("50"))
    clock = [datetime(2026, 11, 30, 23, 59, 59, 600_000, tzinfo=UTC).timestamp()]
    monkeypatch.setattr(limits.policy, "time", SimpleNamespace(time=lambda: clock[0]))

    def periods(plan) -> list[str]:
        return [budget.period for scope in plan.scopes for budget in scope.budgets]

    plan = limits.policy._plan_for(who)
    assert periods(plan) == ["2026-11-30", "2026-11"]
    clock[0] += 0.3
    assert limits.policy._plan_for(who) is plan  # the same day: kept
    clock[0] += 0.2  # 2026-12-01 00:00:00.1
    renewed = limits.policy._plan_for(who)
    assert renewed is not plan and periods(renewed) == ["2026-12-01", "2026-12"]


def test_an_admission_that_leaves_room_for_fewer_than_two_more_is_settled_before_its_answer(tenants):
    """Settlements usually wait to ride with a later write; an admission that leaves room for
    fewer than two more requests like it in a limit its settlement gives back to (slots, a tokens
    bucket, a budget) is told to settle before its answer ends (`release_first`), so that a
    client waiting on it is not refused next time. A requests bucket gets nothing back: it never
    asks."""
    who = principal(tenants, max_concurrent=4, requests_per_minute=100, tokens_per_minute=None,
                    daily_budget_usd=None, monthly_budget_usd=None)
    results = asyncio.run(admit_together(who, [1, 1, 1, 1, 1]))
    assert [getattr(r, "release_first", None) for r in results[:4]] == [False, False, True, True]  # 3, 2, 1, 0 free
    assert isinstance(results[4], GatewayError) and results[4].status == 429
    assert results[0].headers["x-ratelimit-remaining-requests"] == "99"  # the reply's other values still line up
    unlimited = principal(tenants, max_concurrent=None, requests_per_minute=100)
    (admitted,) = asyncio.run(admit_together(unlimited, [1]))
    assert admitted.release_first is False and admitted.headers["x-ratelimit-remaining-requests"] == "99"

    tokens = principal(tenants, max_concurrent=None, requests_per_minute=2, tokens_per_minute=1000,
                       daily_budget_usd=None, monthly_budget_usd=None)
    assert [r.release_first for r in asyncio.run(admit_together(tokens, [300, 300]))] == [False, True]  # 700, 400 left
    budget = principal(tenants, max_concurrent=None, requests_per_minute=100, tokens_per_minute=None,
                       daily_budget_usd=Decimal("5"), monthly_budget_usd=None)

    async def spend(usd: str) -> limits.Admission:
        admission, operation = limits.prepare_admission(budget, f"req-{uuid.uuid4().hex}", 1, nano(Decimal(usd)))
        return outcome(admission, await limits.submit(operation))

    assert asyncio.run(spend("1")).release_first is False  # $4 of $5 left: room for four more
    assert asyncio.run(spend("1.5")).release_first is True  # $2.50 left: room for one more


def test_versions_of_the_limits_library_no_process_uses_are_deleted():
    """Each deploy loads the limits' library under a new name; a version that no process has
    said it uses for the idle time goes, ours stays, and one no process of this database ever
    named (another deployment's, on another database: libraries are global to the server) is
    left alone, however long it has been there."""
    from gateway import scripts

    r = get_redis()
    old, fresh, others, vanished = (f"gw_limits_{digit * 16}" for digit in "0123")
    for name in (old, fresh, others):
        r.execute_command("FUNCTION", "LOAD", "REPLACE",
                          f"#!lua name={name}\nredis.register_function('{name}', function() return 1 end)")
    now = int(time.time() * 1000)
    r.hset(scripts.FUNCTIONS_IN_USE, mapping={old: now - 7_200_000, fresh: now - 60_000, vanished: now - 60_000})

    def libraries() -> set[str]:
        return {entry[b"library_name"].decode() for entry in r.execute_command("FUNCTION", "LIST")}

    try:
        deleted = asyncio.run(scripts.prune_functions([limits.LIMITS], idle_s=3600))
        marks = {name.decode(): int(at) for name, at in r.hgetall(scripts.FUNCTIONS_IN_USE).items()}
        assert deleted == [old] and old not in libraries() and old not in marks
        assert {fresh, others} <= libraries() and marks[fresh] == now - 60_000  # used a minute ago: kept
        assert others not in marks  # not this database's to judge: neither marked nor deleted
        assert asyncio.run(scripts.prune_functions([limits.LIMITS], idle_s=0)) == [fresh]  # others, never
        assert others in libraries()
        assert abs(marks[limits.LIMITS.name] - now) < 5_000  # this process uses it
        assert vanished not in marks  # no longer in Redis: forgotten
    finally:
        for name in (fresh, others):
            if name in libraries():
                r.execute_command("FUNCTION", "DELETE", name)
        r.delete(scripts.FUNCTIONS_IN_USE)


def test_a_usage_row_rides_in_the_settlements_write_and_is_never_sent_twice(tenants, monkeypatch):
    """The row's XADD goes right after the settlement's call, in the same write; when Redis
    refuses that call NOPLAN (it forgot its plans) the call goes again, the row does not."""
    who = principal(tenants, requests_per_minute=10, max_concurrent=5)
    writes: list[int] = []  # per call written: how many riders went with it
    real = limits.batching._Batcher.write

    def noting(self, data, sink, riders):
        writes.append(len(riders))
        return real(self, data, sink, riders)

    monkeypatch.setattr(limits.batching._Batcher, "write", noting)

    async def scenario():
        (first,) = await admit_together(who, [1])
        get_redis().function_load(limits.LIMITS.source, replace=True)  # loaded again: no plans kept
        row = usage_row(request_id=first.request_id, tenant_id=who.tenant_id)
        settled = await limits.submit(limits.settle_operation(first, 1, Decimal(0)), rider=rider(row))
        return settled, first.request_id

    settled, request_id = asyncio.run(scenario())
    assert settled == {"alerts": 0}
    assert writes == [0, 1, 0]  # the admission; the settlement by name, with its row; again in full, alone
    rows = [json.loads(fields[b"row"]) for _, fields in get_redis().xrange(settings.GATEWAY["USAGE_STREAM"])]
    assert [r["request_id"] for r in rows].count(request_id) == 1
    assert get_redis().zcard(f"gw:{{t{who.tenant_id}}}:conc") == 0  # and the settlement ran, once
