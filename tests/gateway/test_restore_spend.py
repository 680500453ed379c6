"""Budget totals live in Redis; after Redis loses them, restore_spend rebuilds them from PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import openai
import pytest
from django.core.management import CommandError, call_command

from billing.models import BudgetAlert, UsageRecord
from billing.periods import nano
from llm_platform.redis import get_redis


def spend(tenant, cost: str, at: datetime, key=None) -> None:
    UsageRecord.objects.create(request_id=f"r-{tenant.pk}-{UsageRecord.objects.count()}", created_at=at, tenant=tenant,
                               api_key=key, model="gpt-4o-mini", cost_usd=Decimal(cost), latency_ms=1, http_status=200)


def lim(tenant, key=None) -> dict[str, str]:
    name = f"gw:{{t{tenant.pk}}}" + (f":k{key.pk}" if key else "") + ":lim"
    return {k.decode(): v.decode() for k, v in get_redis().hgetall(name).items()}


def test_a_lost_total_is_rebuilt_from_the_usage_rows_of_today_and_this_month(tenants, capsys):
    tenant, key, _ = tenants.make(tier={"daily_budget_usd": "5", "monthly_budget_usd": "50"})
    now = datetime.now(UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    spend(tenant, "0.0040000000", now - timedelta(seconds=5), key)
    spend(tenant, "0.0030000000", now - timedelta(seconds=1))
    spend(tenant, "1.5000000000", month_start + timedelta(seconds=1))  # this month (today too on the 1st)
    spend(tenant, "9.0000000000", month_start - timedelta(days=1))  # last month: not counted
    BudgetAlert.objects.create(tenant=tenant, scope="tenant", period=now.strftime("%Y-%m"), threshold=80,
                               spent_usd=Decimal(40), cap_usd=Decimal(50))
    today = Decimal("0.007") + (Decimal("1.5") if now.day == 1 else 0)
    get_redis().delete(f"gw:{{t{tenant.pk}}}:lim")  # what a Redis flush does

    call_command("restore_spend", tenant.slug)

    state = lim(tenant)
    assert (state["d"], state["d:p"], state["d:a"]) == (str(nano(today)), now.strftime("%Y-%m-%d"), "0")
    assert (state["m"], state["m:p"], state["m:a"]) == (str(nano(Decimal("1.507"))), now.strftime("%Y-%m"), "80")
    assert get_redis().pttl(f"gw:{{t{tenant.pk}}}:lim") > 86_400_000  # lives past the month's end
    assert f"{tenant.slug} (tenant): today ${today:.6f}, this month $1.507000" in capsys.readouterr().out


def test_a_larger_running_total_in_redis_is_kept(tenants):
    tenant, _, _ = tenants.make(tier={"daily_budget_usd": "5", "monthly_budget_usd": None})
    spend(tenant, "0.01", datetime.now(UTC))
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    get_redis().hset(f"gw:{{t{tenant.pk}}}:lim", mapping={"d": nano(Decimal("0.02")), "d:p": today, "d:a": 0})

    call_command("restore_spend", tenant.slug)

    state = lim(tenant)
    assert state["d"] == str(nano(Decimal("0.02"))) and "m" not in state  # no monthly budget, no total


def test_a_keys_own_budget_is_rebuilt_from_that_keys_rows(tenants):
    from tenants.models import ApiKey

    tenant, key, _ = tenants.make(tier={"daily_budget_usd": None, "monthly_budget_usd": None})
    key.daily_budget_usd = Decimal("1")
    key.save()
    other, _ = ApiKey.issue(tenant)
    spend(tenant, "0.25", datetime.now(UTC), key)
    spend(tenant, "0.50", datetime.now(UTC), other)

    call_command("restore_spend", tenant.slug)  # Redis is shared by the session's tests: only this tenant

    assert lim(tenant, key)["d"] == str(nano(Decimal("0.25")))
    assert lim(tenant) == {}  # the tenant itself has no budget


def test_after_a_restore_the_cap_refuses_again(server, tenants):
    tenant, _, secret = tenants.make(tier={"daily_budget_usd": "0.001", "monthly_budget_usd": None})
    spend(tenant, "0.0015", datetime.now(UTC))  # already over today's cap, but Redis does not know
    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)
    ask = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
    assert client.chat.completions.with_raw_response.create(**ask).http_response.status_code == 200

    call_command("restore_spend", tenant.slug)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**ask)
    assert refused.value.body["code"] == "insufficient_quota"


def test_an_unknown_tenant_is_an_error(tenants):
    with pytest.raises(CommandError, match="No tenant nope"):
        call_command("restore_spend", "nope")


def test_a_scope_redis_cannot_restore_is_reported_and_the_others_are_restored(tenants, capsys):
    broken, _, _ = tenants.make(tier={"daily_budget_usd": "5", "monthly_budget_usd": None})
    healthy, _, _ = tenants.make(tier={"daily_budget_usd": "5", "monthly_budget_usd": None})
    spend(healthy, "0.25", datetime.now(UTC))
    get_redis().set(f"gw:{{t{broken.pk}}}:lim", "not a hash")  # what a stray write would leave

    with pytest.raises(CommandError, match="1 budget scope"):
        call_command("restore_spend", broken.slug, healthy.slug)

    assert lim(healthy)["d"] == str(nano(Decimal("0.25")))
    err = capsys.readouterr().err
    assert f"{broken.slug} (tenant): NOT restored: WRONGTYPE" in err and healthy.slug not in err
