"""Rebuild the running spend totals in Redis from the usage rows in PostgreSQL.

Budgets are enforced from totals kept in Redis (the scope hashes of lua/limits.lua). If Redis
loses them (a flush, a failover to an empty replica), every tenant would start the day and the
month from zero; `restore_spend` raises each total back to at least what PostgreSQL recorded, keeping a
larger total where Redis still has one, and carries over which alert thresholds were already
raised so they are not raised twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import redis.exceptions
from django.db.models import Max, Q, Sum

from billing.models import BudgetAlert, UsageRecord
from billing.periods import budget_ttl_ms, nano, period_ends
from llm_platform.redis import get_redis
from tenants.models import Tenant

from ..scripts import LuaScript
from .policy import scope_prefix

_SCRIPT = LuaScript("spend_floor.lua").source


@dataclass(frozen=True)
class Restored:
    tenant: str
    scope: str  # "tenant" or "key <prefix>"
    day: Decimal | None  # None: no daily budget in this scope
    month: Decimal | None
    error: str | None = None  # why Redis refused this scope's restore (the others go on)


def restore_spend(slugs: list[str] | None = None, now: datetime | None = None) -> list[Restored]:
    """Raise every budgeted scope's day and month spend in Redis to PostgreSQL's totals."""
    now = now or datetime.now(UTC)
    (day, _), (month, month_left) = period_ends(now)
    day_start = datetime(now.year, now.month, now.day, tzinfo=UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    script = get_redis().register_script(_SCRIPT)
    budgeted = Q(daily_budget_usd__isnull=False) | Q(monthly_budget_usd__isnull=False)
    tenants = Tenant.objects.select_related("tier").order_by("slug")
    if slugs:
        tenants = tenants.filter(slug__in=slugs)
    out = []
    for tenant in tenants:
        scopes = []
        if tenant.tier.daily_budget_usd is not None or tenant.tier.monthly_budget_usd is not None:
            scopes.append(("tenant", "tenant", scope_prefix(tenant.pk), tenant.tier, Q(tenant=tenant)))
        for key in tenant.keys.filter(budgeted).order_by("pk"):
            scopes.append(("key", f"key {key.prefix}", scope_prefix(tenant.pk, key.pk), key, Q(api_key=key)))
        for label, name, prefix, source, rows in scopes:
            api_key = source if label == "key" else None  # whose cap the alerts are about
            totals = UsageRecord.objects.filter(rows).aggregate(
                day=Sum("cost_usd", filter=Q(created_at__gte=day_start), default=Decimal(0)),
                month=Sum("cost_usd", filter=Q(created_at__gte=month_start), default=Decimal(0)))
            args: list = [budget_ttl_ms(month_left)]
            shown = {"day": None, "month": None}
            for field, which, period, attr in (("d", "day", day, "daily_budget_usd"),
                                               ("m", "month", month, "monthly_budget_usd")):
                if getattr(source, attr) is None:
                    continue
                # Alerts are recorded per cap (the tenant's, or one key's) and period.
                alerted = BudgetAlert.objects.filter(tenant=tenant, scope=label, api_key=api_key, period=period).aggregate(
                    top=Max("threshold"))["top"] or 0
                args += [field, period, nano(totals[which]), alerted]
                shown[which] = totals[which]
            try:
                script(keys=[f"{prefix}:lim"], args=args)
            except redis.exceptions.ResponseError as exc:  # e.g. a stray key of the wrong type
                out.append(Restored(tenant.slug, name, None, None, error=str(exc).split(" script: ")[0]))
                continue
            out.append(Restored(tenant.slug, name, shown["day"], shown["month"]))
    return out
