"""The per-process key cache reads a key once per refresh, however many requests carry it."""

from __future__ import annotations

import asyncio

import pytest

from llm_platform.db import close_connections
from tenants import auth
from tenants.models import KEY_PREFIX, key_checksum, key_is_plausible


@pytest.fixture()
def clock(monkeypatch):
    """auth's clock, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(auth, "clock", lambda: now[0])
    auth.forget_local()
    yield now
    auth.forget_local()
    close_connections()  # the ORM threads' connections to the test database


def test_many_requests_across_an_expiry_make_one_lookup(tenants, clock, settings):
    _, key, secret = tenants.make()
    life = settings.GATEWAY["LOCAL_CACHE_SECONDS"]

    async def scenario():
        await auth.authenticate(secret)
        before = auth.stats["lookups"]
        clock[0] += life + 0.001  # every copy expired at once
        results = await asyncio.gather(*(auth.authenticate(secret) for _ in range(1000)),
                                       return_exceptions=True)
        return before, auth.stats["lookups"], results

    before, after, results = asyncio.run(scenario())
    assert after - before == 1
    assert all(not isinstance(r, BaseException) and r.key_id == key.pk for r in results)


def test_a_refresh_ahead_of_expiry_runs_in_the_background_once(tenants, clock, settings):
    _, key, secret = tenants.make()
    life = settings.GATEWAY["LOCAL_CACHE_SECONDS"]

    async def scenario():
        await auth.authenticate(secret)
        before = auth.stats["lookups"]
        clock[0] += life * 0.9  # still fresh, due for a refresh
        results = [await auth.authenticate(secret) for _ in range(100)]  # none waits for it
        started = len(auth._inflight)  # refreshes in flight, not yet run
        await asyncio.gather(*list(auth._inflight.values()))
        clock[0] += life * 0.5  # past the old expiry, within the refreshed entry's life
        await auth.authenticate(secret)
        return started, auth.stats["lookups"] - before, results

    started, total, results = asyncio.run(scenario())
    assert started == 1 and total == 1
    assert all(r.key_id == key.pk for r in results)


def test_a_key_with_a_wrong_checksum_is_refused_without_a_lookup(clock):
    body = KEY_PREFIX + "A" * 43
    wrong = body + ("000000" if key_checksum(body) != "000000" else "000001")
    assert key_is_plausible(body + key_checksum(body)) and not key_is_plausible(wrong)

    async def scenario():
        before = auth.stats["lookups"]
        with pytest.raises(auth.AuthenticationFailed):
            await auth.authenticate(wrong)
        return auth.stats["lookups"] - before

    assert asyncio.run(scenario()) == 0
