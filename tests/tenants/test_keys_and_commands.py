"""Tenants and keys: stored hashed, managed by commands and admin, revoked within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tenants.models import ApiKey, Tenant, Tier, hash_key

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str) -> subprocess.CompletedProcess:
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = {**os.environ, "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.django_db
def test_only_a_hash_of_the_secret_is_stored():
    tenant = Tenant.objects.create(slug="hashy", name="h", tier=Tier.objects.create(name="t-hashy"))
    key, secret = ApiKey.issue(tenant)
    stored = ApiKey.objects.filter(pk=key.pk).values().get()
    assert secret not in {str(v) for v in stored.values()}
    assert stored["hashed_key"] == hash_key(secret)
    assert secret.startswith(stored["prefix"]) and len(stored["prefix"]) == 14


@pytest.mark.django_db
def test_create_tenant_creates_a_generous_tier_when_missing(capsys):
    call_command("create_tenant", "acme-corp", "--name", "Acme", "--tier", "gold")
    tenant = Tenant.objects.get(slug="acme-corp")
    assert tenant.name == "Acme" and tenant.tier.name == "gold"
    assert tenant.tier.requests_per_minute == Tier.GENEROUS_DEFAULTS["requests_per_minute"]
    assert "created tenant acme-corp" in capsys.readouterr().out


@pytest.mark.django_db
def test_issue_key_quiet_prints_only_the_secret(capsys):
    call_command("create_tenant", "quiet-co")
    call_command("issue_key", "quiet-co", "--quiet", "--expires-in", "30")
    out = capsys.readouterr().out.splitlines()
    secret = out[-1]
    assert out[-1].startswith("sk-gw-") and out == ["created tenant quiet-co (tier default)", secret]
    key = ApiKey.objects.get(hashed_key=hash_key(secret))
    assert key.expires_at is not None


@pytest.mark.django_db
def test_revoke_key_by_prefix():
    call_command("create_tenant", "rev-co")
    key, _ = ApiKey.issue(Tenant.objects.get(slug="rev-co"))
    call_command("revoke_key", key.prefix)
    key.refresh_from_db()
    assert key.revoked_at is not None


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (("issue_key", "nobody"), "no tenant with slug 'nobody'"),
        (("revoke_key", "sk-gw-nothing"), "no API key with prefix"),
        (("create_tenant", "Bad Slug!"), "slug"),
    ],
)
def test_bad_arguments_give_a_message_not_a_traceback(args, message):
    with pytest.raises(CommandError, match=message):
        call_command(*args)


def test_commands_exit_non_zero_without_traceback(committed_db):
    result = manage("issue_key", "does-not-exist")
    assert result.returncode == 1
    assert "no tenant with slug" in result.stderr and "Traceback" not in result.stderr
    result = manage("issue_key", "does-not-exist", "--expires-in", "soon")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = manage("create_tenant", "dup-tenant")
    assert result.returncode == 0
    result = manage("create_tenant", "dup-tenant")
    assert result.returncode == 1 and "already exists" in result.stderr


def test_revoked_key_is_refused_within_seconds(server, tenants):
    """Revoking in this process reaches the server process (local cache 1 s here, 3 s default)."""
    _, key, secret = tenants.make()
    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)
    client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
    call_command("revoke_key", key.prefix)
    revoked_at = time.monotonic()
    while True:
        try:
            client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 5, "revocation did not take effect within 5 s"
        time.sleep(0.1)


def test_last_used_at_moves_without_a_write_per_request(server, tenants):
    from tests.conftest import drain_usage

    _, key, secret = tenants.make()
    assert key.last_used_at is None
    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)
    client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
    key.refresh_from_db()
    assert key.last_used_at is None  # the request path wrote nothing to PostgreSQL
    drain_usage()
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_admin_issues_a_key_and_shows_its_secret_once(committed_db, flushed_redis):
    import re

    from django.contrib.auth.models import User
    from django.test import Client

    admin = User.objects.filter(username="keyadmin").first() or User.objects.create_superuser("keyadmin", "a@b.c", "pw-123456789")
    tenant = Tenant.objects.create(slug=f"admin-t-{time.time_ns()}", name="x", tier=Tier.objects.get_or_create(name="default")[0])
    browser = Client()
    browser.force_login(admin)
    response = browser.post("/admin/tenants/apikey/add/", {"tenant": tenant.pk, "name": "from admin", "allowed_models": "[]"}, follow=True)
    assert response.status_code == 200
    shown = re.findall(r"sk-gw-[A-Za-z0-9_\-]{49}", response.content.decode())
    assert len(shown) == 1
    key = ApiKey.objects.get(tenant=tenant)
    assert key.hashed_key == hash_key(shown[0])
    page = browser.get(f"/admin/tenants/apikey/{key.pk}/change/")
    assert shown[0] not in page.content.decode()
