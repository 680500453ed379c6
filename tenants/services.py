"""Operator actions on tenants and keys, shared by management commands and admin."""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.db import transaction

from .models import ApiKey, LimitFields, Tenant, Tier


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


# --- limits ---------------------------------------------------------------------------------

# Command-line flag -> limit field (the same names on Tier and on ApiKey).
LIMIT_FLAGS: dict[str, str] = {
    "rpm": "requests_per_minute",
    "rph": "requests_per_hour",
    "tpm": "tokens_per_minute",
    "concurrency": "max_concurrent",
    "max-tokens": "max_tokens_cap",
    "daily-budget": "daily_budget_usd",
    "monthly-budget": "monthly_budget_usd",
    "models": "allowed_models",
}
_FLAG_OF = {field: flag for flag, field in LIMIT_FLAGS.items()}
LIMIT_FIELDS = (*LimitFields.LIMIT_NAMES, "allowed_models")
_DECIMAL_FIELDS = {"daily_budget_usd", "monthly_budget_usd"}
_CLEAR = "none"


def _label(field: str) -> str:
    return f"--{_FLAG_OF[field]} ({field})" if field in _FLAG_OF else field


def custom_tier_name(slug: str) -> str:
    """`<slug>-custom`, shortened with a hash when that would not fit Tier.name (50 chars)."""
    name = f"{slug}-custom"
    limit = Tier._meta.get_field("name").max_length
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(slug.encode()).hexdigest()[:7]
    return f"{slug[: limit - len('-custom') - 8]}-{digest}-custom"


def parse_limit(field: str, value: object) -> object:
    """One limit value, from operator text or Python: None clears, ints > 0, budgets >= 0.

    Text is parsed here rather than by argparse so a bad value is an operator message (exit 1).
    """
    if field not in LIMIT_FIELDS:
        raise TenantError(f"unknown limit {field!r}; known: {', '.join(LIMIT_FIELDS)}")
    if isinstance(value, str) and value.strip().lower() == _CLEAR:
        value = None
    if field == "allowed_models":
        return _parse_models(value)
    if value is None:
        return None
    if field in _DECIMAL_FIELDS:
        return _parse_budget(field, value)
    return _parse_positive_int(field, value)


def _parse_models(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple):
        names = [str(part).strip() for part in value]
    else:
        raise TenantError(f"{_label('allowed_models')} must be comma-separated model names")
    names = [name for name in names if name]
    if not names:
        raise TenantError(
            f"{_label('allowed_models')} has no model names; give \"\" or none for every model"
        )
    return list(dict.fromkeys(names))  # drop repeats, keep the order given


def _parse_positive_int(field: str, value: object) -> int:
    problem = f"{_label(field)} must be a positive whole number or 'none', not {value!r}"
    if isinstance(value, bool):
        raise TenantError(problem)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise TenantError(problem) from None
    if not isinstance(value, int) or value <= 0:
        raise TenantError(problem)
    _check_field(field, value)
    return value


def _parse_budget(field: str, value: object) -> Decimal:
    problem = f"{_label(field)} must be a non-negative amount in USD or 'none', not {value!r}"
    if isinstance(value, bool | float):
        raise TenantError(problem)  # floats are not exact money; pass text or Decimal
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except (InvalidOperation, TypeError, ValueError):
        raise TenantError(problem) from None
    if not amount.is_finite() or amount < 0:
        raise TenantError(problem)
    _check_field(field, amount)
    return amount


def _check_field(field: str, value: object) -> None:
    """The model field's own validators: database range, digits and decimal places."""
    try:
        Tier._meta.get_field(field).run_validators(value)
    except ValidationError as exc:
        raise TenantError(f"{_label(field)}: {' '.join(exc.messages)}") from None


def _find_tenant_key(tenant: Tenant, prefix: str) -> ApiKey:
    """The tenant's key with this prefix, matched like revoke_key; another tenant's is refused."""
    if len(prefix) < 6:
        raise TenantError(f"no API key with prefix {prefix!r} (give at least 6 characters)")
    matches = list(
        ApiKey.objects.select_for_update()
        .filter(tenant=tenant, prefix__startswith=prefix)
        .order_by("pk")[:2]
    )
    if len(matches) > 1:
        raise TenantError(f"prefix {prefix!r} matches more than one key; give more characters")
    if not matches:
        other = ApiKey.objects.filter(prefix__startswith=prefix).select_related("tenant").first()
        if other is not None:
            raise TenantError(
                f"API key {other.prefix}… belongs to tenant {other.tenant.slug!r}, "
                f"not {tenant.slug!r}"
            )
        raise TenantError(f"no API key with prefix {prefix!r} for tenant {tenant.slug!r}")
    return matches[0]


def _own_tier(tenant: Tenant) -> Tier:
    """The tier only this tenant uses, cloned from its current tier unless it already has one.

    Changing a shared tier would change every tenant on it, so a tenant gets `<slug>-custom`.
    """
    name = custom_tier_name(tenant.slug)
    current = tenant.tier
    if current.name == name and not current.tenants.exclude(pk=tenant.pk).exists():
        return Tier.objects.select_for_update().get(pk=current.pk)
    copy = {field: getattr(current, field) for field in LimitFields.LIMIT_NAMES}
    copy["allowed_models"] = list(current.allowed_models or [])
    description = f"limits of tenant {tenant.slug}"
    tier = Tier.objects.select_for_update().filter(name=name).first()
    if tier is None:
        tier = Tier.objects.create(name=name, description=description, **copy)
    else:
        # Left over (the tenant was moved back to a shared tier): reuse it if nobody else is on it.
        others = tier.tenants.exclude(pk=tenant.pk).values_list("slug", flat=True)[:3]
        if others:
            raise TenantError(
                f"tier {name!r} is also used by {', '.join(others)}; move them to another tier "
                "before changing this tenant's limits"
            )
        for field, value in copy.items():
            setattr(tier, field, value)
        tier.description = description
        tier.save()
    if tenant.tier_id != tier.pk:
        tenant.tier = tier
        tenant.save(update_fields=["tier"])  # signal: drop this tenant's cached principals
    return tier


@transaction.atomic
def set_limits(slug: str, key_prefix: str | None = None, **changes: object) -> Tier | ApiKey:
    """Change a tenant's own limits (its `<slug>-custom` tier) or one key's overrides.

    `changes` maps limit fields to values; text is parsed (`"none"` clears: unlimited on a tier,
    "use the tier's" on a key). Saving goes through `.save()`, so the signals drop the cached
    principals after commit and every process sees the change within its local cache time.
    """
    if not changes:
        flags = ", ".join(f"--{flag}" for flag in LIMIT_FLAGS)
        raise TenantError(f"nothing to change; give at least one of {flags}")
    parsed = {field: parse_limit(field, value) for field, value in changes.items()}
    try:
        tenant = Tenant.objects.select_for_update().select_related("tier").get(slug=slug)
    except Tenant.DoesNotExist:
        raise TenantError(f"no tenant with slug {slug!r}") from None
    target: Tier | ApiKey
    if key_prefix is not None:
        target = _find_tenant_key(tenant, key_prefix)
        target.tenant = tenant
    else:
        target = _own_tier(tenant)
    for field, value in parsed.items():
        setattr(target, field, value)
    target.save(update_fields=list(parsed))  # signals: cached principals dropped on commit
    return target


def effective_limits(target: Tier | ApiKey) -> list[tuple[str, object, str]]:
    """(field, value, where it comes from) for every limit: a key's override or its tier's."""
    tier = target.tenant.tier if isinstance(target, ApiKey) else target
    rows = []
    for field in LIMIT_FIELDS:
        value, source = getattr(tier, field), f"tier {tier.name}"
        if isinstance(target, ApiKey):
            override = getattr(target, field)
            if override not in (None, []):
                value, source = override, "key override"
        rows.append((field, value, source))
    return rows
