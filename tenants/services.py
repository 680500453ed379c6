"""Operator actions on tenants and keys, shared by management commands and admin."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from .models import ApiKey, Tenant, Tier


class TenantError(Exception):
    """An operator asked for something that cannot be done; the message says why."""


def get_or_create_tier(name: str) -> Tier:
    tier, _ = Tier.objects.get_or_create(name=name, defaults=dict(Tier.GENEROUS_DEFAULTS))
    return tier


@transaction.atomic
def create_tenant(slug: str, name: str | None = None, tier: str = "default") -> Tenant:
    if Tenant.objects.filter(slug=slug).exists():
        raise TenantError(f"tenant {slug!r} already exists")
    tenant = Tenant(slug=slug, name=name or slug, tier=get_or_create_tier(tier))
    try:
        tenant.full_clean()
    except ValidationError as exc:
        problems = "; ".join(f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items())
        raise TenantError(problems) from None
    tenant.save()
    return tenant


def get_tenant(slug: str) -> Tenant:
    try:
        return Tenant.objects.select_related("tier").get(slug=slug)
    except Tenant.DoesNotExist:
        raise TenantError(f"no tenant with slug {slug!r}") from None


def issue_key(slug: str, name: str = "", expires_in_days: int | None = None) -> tuple[ApiKey, str]:
    if expires_in_days is not None and expires_in_days <= 0:
        raise TenantError("--expires-in must be a positive number of days")
    return ApiKey.issue(get_tenant(slug), name=name, expires_in_days=expires_in_days)


def revoke_key(prefix: str) -> ApiKey:
    matches = list(ApiKey.objects.filter(prefix__startswith=prefix)[:2]) if len(prefix) >= 6 else []
    if not matches:
        raise TenantError(f"no API key with prefix {prefix!r}")
    if len(matches) > 1:
        raise TenantError(f"prefix {prefix!r} matches more than one key; give more characters")
    key = matches[0]
    key.revoke()
    return key
