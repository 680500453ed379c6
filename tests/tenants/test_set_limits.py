"""set_limits: a tenant's own tier (shared tiers cloned first), key overrides, operator errors."""

from __future__ import annotations

import uuid
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tenants.auth import redis_key
from tenants.models import ApiKey, Tenant, Tier
from tenants.services import custom_tier_name
from tests.tenants.test_keys_and_commands import manage


def run(*args: str) -> str:
    out = StringIO()
    call_command("set_limits", *args, stdout=out)
    return out.getvalue()


def lines(output: str) -> dict[str, str]:
    """`field: value (source)` lines of the command's output, by field."""
    return dict(line.split(": ", 1) for line in output.splitlines()[1:])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def shared():
    """Two tenants on one shared tier, with a key each."""
    tier = Tier.objects.create(
        name=unique("shared"), description="shared", allowed_models=["local"],
        **Tier.GENEROUS_DEFAULTS,
    )
    a = Tenant.objects.create(slug=unique("alpha"), name="A", tier=tier)
    b = Tenant.objects.create(slug=unique("beta"), name="B", tier=tier)
    return tier, a, b


@pytest.mark.django_db
def test_shared_tier_is_cloned_and_the_other_tenant_keeps_it(shared):
    tier, a, b = shared
    output = run(a.slug, "--rpm", "100", "--daily-budget", "5.50")
    a.refresh_from_db()
    b.refresh_from_db()
    own = a.tier
    assert own.name == f"{a.slug}-custom" and own.description == f"limits of tenant {a.slug}"
    assert own.requests_per_minute == 100 and own.daily_budget_usd == Decimal("5.5")
    # everything not changed is copied from the shared tier
    assert own.requests_per_hour == tier.requests_per_hour
    assert own.monthly_budget_usd == tier.monthly_budget_usd
    assert own.allowed_models == ["local"]
    # the other tenant and the shared tier are untouched
    assert b.tier_id == tier.pk
    tier.refresh_from_db()
    assert tier.requests_per_minute == Tier.GENEROUS_DEFAULTS["requests_per_minute"]
    assert tier.daily_budget_usd == Tier.GENEROUS_DEFAULTS["daily_budget_usd"]
    shown = lines(output)
    assert shown["requests_per_minute"] == f"100 (tier {own.name})"
    assert shown["daily_budget_usd"] == f"5.5 (tier {own.name})"
    assert shown["allowed_models"] == f"local (tier {own.name})"
    assert set(shown) == {*Tier.LIMIT_NAMES, "allowed_models"}


@pytest.mark.django_db
def test_second_call_updates_the_same_custom_tier(shared):
    _, a, _ = shared
    run(a.slug, "--rpm", "100", "--daily-budget", "5")
    first = Tenant.objects.get(pk=a.pk).tier
    tiers = Tier.objects.count()
    output = run(a.slug, "--rpm", "none", "--tpm", "5000", "--models", "")
    own = Tenant.objects.get(pk=a.pk).tier
    assert own.pk == first.pk and Tier.objects.count() == tiers
    assert own.requests_per_minute is None  # none = unlimited on a tier
    assert own.tokens_per_minute == 5000
    assert own.daily_budget_usd == Decimal("5")  # kept from the first call
    assert own.allowed_models == []
    shown = lines(output)
    assert shown["requests_per_minute"].startswith("unlimited")
    assert shown["allowed_models"].startswith("all models")


@pytest.mark.django_db
def test_a_tier_used_only_by_this_tenant_is_still_cloned():
    """Only `<slug>-custom` counts as the tenant's own; a named tier may be given to others later."""
    gold = Tier.objects.create(name=unique("gold"), **Tier.GENEROUS_DEFAULTS)
    tenant = Tenant.objects.create(slug=unique("solo"), name="S", tier=gold)
    run(tenant.slug, "--concurrency", "3")
    tenant.refresh_from_db()
    assert tenant.tier.name == f"{tenant.slug}-custom" and tenant.tier.max_concurrent == 3
    gold.refresh_from_db()
    assert gold.max_concurrent == Tier.GENEROUS_DEFAULTS["max_concurrent"]


@pytest.mark.django_db
def test_a_leftover_custom_tier_is_refilled_from_the_current_tier(shared):
    """Moved back to a shared tier after an earlier set_limits: start again from the shared one."""
    tier, a, _ = shared
    run(a.slug, "--rpm", "7", "--rph", "70")
    Tenant.objects.filter(pk=a.pk).update(tier=tier)
    run(a.slug, "--tpm", "9000")
    own = Tenant.objects.get(pk=a.pk).tier
    assert own.name == f"{a.slug}-custom" and own.tokens_per_minute == 9000
    assert own.requests_per_minute == tier.requests_per_minute  # the old 7 does not come back
    assert own.requests_per_hour == tier.requests_per_hour


@pytest.mark.django_db
def test_custom_tier_shared_with_another_tenant_is_refused(shared):
    _, a, b = shared
    run(a.slug, "--rpm", "7")
    Tenant.objects.filter(pk=b.pk).update(tier=Tenant.objects.get(pk=a.pk).tier)
    with pytest.raises(CommandError, match=f"also used by {b.slug}"):
        run(a.slug, "--rpm", "8")


def test_custom_tier_name_fits_the_column():
    long_slug = "a" * 50
    name = custom_tier_name(long_slug)
    assert len(name) == 50 and name.endswith("-custom") and name.startswith("a" * 35)
    assert custom_tier_name("a" * 49) != custom_tier_name("a" * 48)
    assert custom_tier_name("acme") == "acme-custom"


@pytest.mark.django_db
def test_key_overrides_are_set_and_none_clears_them(shared):
    tier, a, _ = shared
    key, _ = ApiKey.issue(a, name="k")
    output = run(a.slug, "--key", key.prefix[:10], "--rpm", "10", "--monthly-budget", "12.3456",
                 "--models", "local, gpt-4o-mini,local")
    key.refresh_from_db()
    assert key.requests_per_minute == 10 and key.monthly_budget_usd == Decimal("12.3456")
    assert key.allowed_models == ["local", "gpt-4o-mini"]
    a.refresh_from_db()
    assert a.tier_id == tier.pk  # a key change leaves the tenant's tier alone
    shown = lines(output)
    assert output.splitlines()[0] == f"limits of key {key.prefix}… of tenant {a.slug}:"
    assert shown["requests_per_minute"] == "10 (key override)"
    assert shown["requests_per_hour"] == f"20000 (tier {tier.name})"
    assert shown["allowed_models"] == "local, gpt-4o-mini (key override)"

    output = run(a.slug, "--key", key.prefix, "--rpm", "NONE", "--models", "none")
    key.refresh_from_db()
    assert key.requests_per_minute is None and key.allowed_models == []
    assert key.monthly_budget_usd == Decimal("12.3456")
    shown = lines(output)
    assert shown["requests_per_minute"] == f"600 (tier {tier.name})"
    assert shown["allowed_models"] == f"local (tier {tier.name})"


@pytest.mark.django_db
def test_ambiguous_key_prefix_is_refused(shared):
    _, a, _ = shared
    ApiKey.objects.create(tenant=a, prefix="sk-gw-ambig001", hashed_key="1" * 64)
    ApiKey.objects.create(tenant=a, prefix="sk-gw-ambig002", hashed_key="2" * 64)
    with pytest.raises(CommandError, match="more than one key"):
        run(a.slug, "--key", "sk-gw-ambig", "--rpm", "5")
    run(a.slug, "--key", "sk-gw-ambig002", "--rpm", "5")
    assert ApiKey.objects.get(prefix="sk-gw-ambig002").requests_per_minute == 5


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (("--rpm", "-5"), r"--rpm \(requests_per_minute\) must be a positive whole number"),
        (("--rph", "0"), "must be a positive whole number"),
        (("--tpm", "lots"), "must be a positive whole number or 'none', not 'lots'"),
        (("--concurrency", "2.5"), "must be a positive whole number"),
        (("--max-tokens", "99999999999"), "less than or equal to"),
        (("--daily-budget", "-1"), "must be a non-negative amount in USD"),
        (("--monthly-budget", "ten"), "must be a non-negative amount in USD or 'none', not 'ten'"),
        (("--daily-budget", "NaN"), "non-negative amount"),
        (("--daily-budget", "1.23456"), "decimal places"),
        (("--models", " , "), "no model names"),
        ((), "nothing to change; give at least one of --rpm"),
    ],
)
def test_bad_values_are_operator_messages(shared, args, message):
    tier, a, _ = shared
    with pytest.raises(CommandError, match=message):
        run(a.slug, *args)
    a.refresh_from_db()
    assert a.tier_id == tier.pk  # nothing was cloned or changed
    assert not Tier.objects.filter(name=f"{a.slug}-custom").exists()


@pytest.mark.django_db
def test_unknown_tenant_and_other_tenants_key_are_refused(shared):
    _, a, b = shared
    key_b, _ = ApiKey.issue(b)
    with pytest.raises(CommandError, match="no tenant with slug 'nobody-here'"):
        run("nobody-here", "--rpm", "5")
    with pytest.raises(CommandError, match=f"belongs to tenant '{b.slug}', not '{a.slug}'"):
        run(a.slug, "--key", key_b.prefix, "--rpm", "5")
    with pytest.raises(CommandError, match="no API key with prefix 'sk-gw-zzzzzzzz'"):
        run(a.slug, "--key", "sk-gw-zzzzzzzz", "--rpm", "5")
    key_b.refresh_from_db()
    assert key_b.requests_per_minute is None


def test_exit_codes_and_output_without_traceback(tenants):
    tenant, _, _ = tenants.make()
    result = manage("set_limits", tenant.slug, "--rpm", "abc")
    assert result.returncode == 1, result.stderr
    assert "must be a positive whole number" in result.stderr and "Traceback" not in result.stderr
    result = manage("set_limits", "does-not-exist", "--rpm", "5")
    assert result.returncode == 1 and "no tenant with slug" in result.stderr
    result = manage("set_limits", tenant.slug)
    assert result.returncode == 1 and "nothing to change" in result.stderr
    result = manage("set_limits", tenant.slug, "--bogus", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = manage("set_limits", tenant.slug, "--rpm", "42", "--models", "")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == f"limits of tenant {tenant.slug} (its own tier {tenant.slug}-custom):"
    assert f"requests_per_minute: 42 (tier {tenant.slug}-custom)" in out
    assert len(out) == 1 + len(Tier.LIMIT_NAMES) + 1


def test_cached_principals_are_dropped_after_commit(tenants, flushed_redis):
    """The signals delete `gw:key:<hash>` on commit; processes then reload within seconds."""
    tenant, key, _ = tenants.make()
    other = Tenant.objects.create(slug=unique("other"), name="o", tier=tenant.tier)
    other_key, _ = ApiKey.issue(other)
    second_key, _ = ApiKey.issue(tenant)
    cached = [redis_key(k.hashed_key) for k in (key, second_key, other_key)]

    flushed_redis.set(cached[0], b"{}")
    flushed_redis.set(cached[1], b"{}")
    flushed_redis.set(cached[2], b"{}")
    call_command("set_limits", tenant.slug, "--rpm", "33", stdout=StringIO())
    assert flushed_redis.exists(cached[0]) == 0 and flushed_redis.exists(cached[1]) == 0
    assert flushed_redis.exists(cached[2]) == 1  # the other tenant on the old tier is unaffected

    flushed_redis.set(cached[0], b"{}")
    flushed_redis.set(cached[1], b"{}")
    call_command("set_limits", tenant.slug, "--rph", "333", stdout=StringIO())  # update own tier
    assert flushed_redis.exists(cached[0]) == 0 and flushed_redis.exists(cached[1]) == 0

    flushed_redis.set(cached[0], b"{}")
    flushed_redis.set(cached[1], b"{}")
    call_command("set_limits", tenant.slug, "--key", key.prefix, "--rpm", "3", stdout=StringIO())
    assert flushed_redis.exists(cached[0]) == 0
    assert flushed_redis.exists(cached[1]) == 1  # only that key changed
    flushed_redis.delete(*cached)


@pytest.mark.django_db
def test_nothing_is_invalidated_when_the_change_is_refused(django_capture_on_commit_callbacks, shared):
    _, a, _ = shared
    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(CommandError):
        run(a.slug, "--rpm", "5", "--tpm", "x")
    assert callbacks == []
