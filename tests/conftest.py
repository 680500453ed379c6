"""Shared fixtures: a real ASGI server (uvicorn) over the test database, fake upstreams, tenants.

Tests that go through the running server need committed data (the server is another process),
so they use `committed_db` rather than `django_db`'s rolled-back transaction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from llm_platform.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tests" / "schemas"  # copies of the vendors' JSON Schemas (tests/schemas/README.md)


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment, django_db_blocker):
    """Always create the test database: server-backed tests use it without a `django_db` mark."""
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    with django_db_blocker.unblock():
        teardown_databases(config, verbosity=0)


@pytest.fixture(scope="session")
def flushed_redis():
    from llm_platform.redis import get_redis

    get_redis().flushdb()
    yield get_redis()


@pytest.fixture(scope="session")
def fake_openai():
    from tests.support.fake_openai import FakeOpenAI

    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_anthropic():
    from tests.support.fake_anthropic import FakeAnthropic

    server = FakeAnthropic().start()
    yield server
    server.stop()


def clear_lane_health() -> None:
    """Breakers, 429 holds and upstream budgets are shared state: each test starts healthy."""
    from llm_platform.redis import get_redis

    client = get_redis()
    keys = list(client.scan_iter("gw:lane:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture()
def fakes_reset(fake_openai, fake_anthropic, flushed_redis):
    fake_openai.reset()
    fake_anthropic.reset()
    clear_lane_health()
    yield
    fake_openai.reset()
    fake_anthropic.reset()
    clear_lane_health()


def routes_yaml(openai_url: str, anthropic_root: str) -> str:
    return f"""
routes:
  - model: local
    lanes:
      - provider: local
        upstream_model: local
        context_window: 32768
        options: {{tokens_per_second: 0}}
  - model: local-slow
    lanes:
      - provider: local
        upstream_model: local
        context_window: 32768
        options: {{tokens_per_second: 50}}
  - model: local-small
    lanes:
      - provider: local
        upstream_model: local
        context_window: 60
        options: {{tokens_per_second: 0}}
  - model: gpt-4o-mini
    lanes:
      - provider: openai-compatible
        upstream_model: gpt-4o-mini
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
        context_window: 128000
        prices: {{input: "0.15", output: "0.60", cached_input: "0.075"}}
  - model: claude-sonnet
    lanes:
      - provider: anthropic
        upstream_model: claude-sonnet-4-5
        base_url: {anthropic_root}
        api_key_env: FAKE_UPSTREAM_KEY
        context_window: 200000
        prices: {{input: "3", output: "15", cached_input: "0.30"}}
  - model: fallback-openai-first
    lanes:
      - provider: openai-compatible
        upstream_model: fb-openai
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
        retry: {{max_attempts: 1}}
      - provider: anthropic
        upstream_model: fb-claude
        base_url: {anthropic_root}
        api_key_env: FAKE_UPSTREAM_KEY
  - model: fallback-anthropic-first
    lanes:
      - provider: anthropic
        upstream_model: fb2-claude
        base_url: {anthropic_root}
        api_key_env: FAKE_UPSTREAM_KEY
        retry: {{max_attempts: 1}}
      - provider: openai-compatible
        upstream_model: fb2-openai
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
  - model: flaky
    lanes:
      - provider: openai-compatible
        upstream_model: flaky-model
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
        retry: {{max_attempts: 1}}
        breaker: {{min_calls: 4, error_rate: 0.5, cooldown_s: 1.5, close_after: 2, probes: 1}}
  - model: brownout
    lanes:
      - provider: openai-compatible
        upstream_model: brownout-model
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
        breaker: {{min_calls: 3, slow_ms: 150, cooldown_s: 30}}
  - model: dead-primary
    lanes:
      - provider: openai-compatible
        upstream_model: dead-model
        base_url: http://127.0.0.1:9/v1
        retry: {{max_attempts: 2, base_ms: 10}}
      - provider: openai-compatible
        upstream_model: alive-model
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
  - model: slowpoke
    lanes:
      - provider: openai-compatible
        upstream_model: slow-model
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
        timeouts: {{total_s: 1, idle_s: 0.5}}
        retry: {{max_attempts: 1}}
  - model: budgeted
    lanes:
      - provider: openai-compatible
        upstream_model: budget-model
        base_url: {openai_url}
        api_key_env: FAKE_UPSTREAM_KEY
        limits: {{rpm: 2}}
      - provider: local
        upstream_model: local
  - model: unconfigured
    lanes:
      - provider: openai
        upstream_model: gpt-4o
        api_key_env: GW_TEST_UNSET_VARIABLE
"""


@pytest.fixture(scope="session")
def routes(django_db_setup, django_db_blocker, fake_openai, fake_anthropic, tmp_path_factory):
    from django.core.management import call_command

    path = tmp_path_factory.mktemp("routes") / "routes.yaml"
    path.write_text(routes_yaml(fake_openai.base_url, fake_anthropic.root_url))
    with django_db_blocker.unblock():
        call_command("load_routes", str(path))
    return path


@pytest.fixture()
def committed_db(django_db_setup, django_db_blocker):
    """DB access outside a test transaction: what we write is visible to the server process."""
    with django_db_blocker.unblock():
        yield


class Tenants:
    """Make committed tenants and keys with unique names (each test owns its own)."""

    def make(self, tier: dict | None = None, **tenant_fields):
        from tenants.models import ApiKey, Tenant, Tier

        slug = f"t-{uuid.uuid4().hex[:10]}"
        tier_obj = Tier.objects.create(name=f"tier-{slug}", **{**Tier.GENEROUS_DEFAULTS, **(tier or {})})
        tenant = Tenant.objects.create(slug=slug, name=slug, tier=tier_obj, **tenant_fields)
        key, secret = ApiKey.issue(tenant, name="test")
        return tenant, key, secret


@pytest.fixture()
def tenants(committed_db, flushed_redis):
    return Tenants()


def _server_env(port: int, extra: dict | None = None) -> dict:
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "FAKE_UPSTREAM_KEY": "sk-fake-upstream-credential-123456",
        "GW_LOCAL_CACHE_SECONDS": "1",
        "GW_LOCAL_TOKENS_PER_SECOND": "0",
        "LOG_LEVEL": "WARNING",
        "GW_BAD_KEY_RATE": "1000/m",
    })
    env.update(extra or {})
    return env


class Server:
    def __init__(self, extra_env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / ".data" / f"server-{self.port}.log", "w") if (ROOT / ".data").exists() else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "llm_platform.asgi:application", "--host", "127.0.0.1",
             "--port", str(self.port), "--loop", "uvloop", "--http", "llm_platform.server_protocol:BoundedHttpToolsProtocol", "--lifespan", "on",
             "--no-access-log"],
            cwd=ROOT, env=_server_env(self.port, extra_env), stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {self.proc.poll()})")
            time.sleep(0.1)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def server(routes, flushed_redis):
    (ROOT / ".data").mkdir(exist_ok=True)
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture()
def tenant(tenants):
    return tenants.make()


@pytest.fixture()
def client(server, tenant):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key=tenant[2], max_retries=0, timeout=20)


def drain_usage(quiet_s: float = 0.1) -> int:
    """Drain the usage, alert and breaker streams into PostgreSQL until they stay empty for
    `quiet_s`: settlement runs just after the response is sent, and its write may wait up to
    GW_REDIS_DEFER_MS to leave with another request's."""
    from billing.writer import drain_all

    total, quiet_since = 0, time.monotonic()
    while True:
        moved = drain_all("test-writer")
        total += moved
        if moved:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return total
        time.sleep(0.01)


def usage_row(request_id: str, timeout: float = 5.0):
    """The usage row of one request, once the writer has stored it."""
    from billing.models import UsageRecord

    deadline = time.monotonic() + timeout
    while True:
        drain_usage(quiet_s=0)
        row = UsageRecord.objects.filter(request_id=request_id).first()
        if row is not None or time.monotonic() > deadline:
            assert row is not None, f"no usage row for {request_id} within {timeout} s"
            return row
        time.sleep(0.02)
