"""Limits hold across processes: buckets, token reservations, concurrency, windows, budgets."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime

import aiohttp
import openai
import pytest

from llm_platform.redis import get_redis
from tests.conftest import Server, drain_usage, usage_row

# Far from every limit: requests are admitted from leases (README, "Leases").
BIG = {"requests_per_minute": 100_000, "requests_per_hour": None, "tokens_per_minute": None, "max_concurrent": 1000,
       "daily_budget_usd": None, "monthly_budget_usd": None}


def chat(server, secret, model="local", content="hello", **extra):
    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=extra.pop("max_retries", 0), timeout=30)
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}], **extra)


async def post_many(urls_and_keys, body, concurrency=None):
    async with aiohttp.ClientSession() as session:
        async def one(url, key):
            async with session.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
                await response.read()
                return response.status, dict(response.headers)
        return await asyncio.gather(*(one(url, key) for url, key in urls_and_keys))


def test_requests_per_minute_refuses_with_retry_after_and_headers(server, tenants):
    _, _, secret = tenants.make(tier={"requests_per_minute": 3})
    remaining = [int(chat(server, secret).headers["x-ratelimit-remaining-requests"]) for _ in range(3)]
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        chat(server, secret)
    response = caught.value.response
    assert int(response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "rate_limit_exceeded" and "requests per minute" in caught.value.body["message"]


def test_every_success_carries_openai_rate_limit_headers(server, tenants):
    _, _, secret = tenants.make(tier={"requests_per_minute": 100, "tokens_per_minute": 50_000})
    headers = chat(server, secret).headers
    assert headers["x-ratelimit-limit-requests"] == "100" and headers["x-ratelimit-remaining-requests"] == "99"
    assert headers["x-ratelimit-limit-tokens"] == "50000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 50_000
    assert headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))


def test_reset_times_are_in_openais_format():
    from gateway.limits import reset_text

    assert [reset_text(ms) for ms in (-5, 0, 120, 999, 1000, 1500, 59_999, 60_000, 361_500)] == [
        b"0ms", b"0ms", b"120ms", b"999ms", b"1s", b"1.5s", b"60s", b"1m0s", b"6m1s"]


def test_the_sdk_retry_succeeds_once_the_bucket_refills(server, tenants):
    _, _, secret = tenants.make(tier={"requests_per_minute": 20})  # one request back every 3 s
    burst = asyncio.run(post_many([(server.base_url, secret)] * 25, {"model": "local", "messages": [{"role": "user", "content": "x"}]}))
    assert any(status == 429 for status, _ in burst)  # the bucket is empty
    seen: list[int] = []
    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=4,
                           http_client=openai.DefaultHttpxClient(event_hooks={"response": [lambda r: seen.append(r.status_code)]}))
    completion = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
    assert completion.choices[0].message.content
    assert seen[0] == 429 and seen[-1] == 200  # refused first, then the SDK's own retry got in


def settled_tokens(tenant_id: int, limit: int, used: int, since: float) -> tuple[float, float]:
    """(bucket level, what it may have refilled) once settlement has brought the level to
    `limit - used` (+ the refill since `since`), or when 3 s have passed; settlement runs just
    after the response is sent."""
    deadline = time.monotonic() + 3
    while True:
        level = float(get_redis().hget(f"gw:{{t{tenant_id}}}:lim", "tpm"))
        refill = (time.monotonic() - since) * limit / 60
        if limit - used <= level <= limit - used + refill + 1 or time.monotonic() > deadline:
            return level, refill
        time.sleep(0.02)


def test_reserved_tokens_are_refunded_to_what_was_used(server, tenants):
    tenant, _, secret = tenants.make(tier={"tokens_per_minute": 3000})
    before = time.monotonic()
    response = chat(server, secret, max_tokens=1000)
    reserved_left = int(response.headers["x-ratelimit-remaining-tokens"])
    usage = response.parse().usage
    assert reserved_left <= 3000 - 1000 - usage.prompt_tokens  # the reservation held max_tokens
    level, refill = settled_tokens(tenant.pk, 3000, usage.total_tokens, before)
    assert 3000 - usage.total_tokens <= level <= 3000 - usage.total_tokens + refill + 1


def test_an_overshoot_is_charged_not_refused_after_the_fact(server, tenants, fakes_reset):
    tenant, _, secret = tenants.make(tier={"tokens_per_minute": 2000})
    before = time.monotonic()
    response = chat(server, secret, model="gpt-4o-mini", content="hi [[cache:900]]", max_tokens=5)
    assert response.http_response.status_code == 200
    usage = response.parse().usage
    assert usage.prompt_tokens > 900  # the provider counted far more than we reserved
    assert int(response.headers["x-ratelimit-remaining-tokens"]) > 2000 - usage.total_tokens  # reserved less
    level, refill = settled_tokens(tenant.pk, 2000, usage.total_tokens, before)
    assert 2000 - usage.total_tokens <= level <= 2000 - usage.total_tokens + refill + 1


def test_a_request_bigger_than_the_token_limit_is_a_clear_400(server, tenants):
    _, _, secret = tenants.make(tier={"tokens_per_minute": 100})
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, secret, max_tokens=500)
    assert caught.value.body["code"] == "request_exceeds_limit"


def test_context_window_overflow_is_400_context_length_exceeded(server, tenant):
    long = "word " * 80
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, tenant[2], model="local-small", content=long)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_trimming_drops_the_oldest_turns_and_says_how_many(server, tenant):
    client = openai.OpenAI(base_url=server.base_url, api_key=tenant[2], max_retries=0)
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question number {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    messages.append({"role": "user", "content": "final question"})
    response = client.chat.completions.with_raw_response.create(model="local-small", messages=messages, max_tokens=5,
                                                                extra_body={"context_overflow": "trim_oldest"})
    assert response.http_response.status_code == 200
    assert int(response.headers["x-context-trimmed-messages"]) >= 2
    assert response.parse().choices[0].message.content.startswith("Hello from")


def slow_stream(url: str, secret: str, hang_up_after: int | None = None, length: int = 8):
    """Start a slow local stream; returns (request id, SSE text read)."""
    async def run():
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                          json={"model": "local-slow", "stream": True, "messages": [{"role": "user", "content": "a long answer " * length}]})
            events = 0
            async for line in response.content:
                events += line.startswith(b"data: ")
                if hang_up_after is not None and events >= hang_up_after:
                    break
            response.close()
            return response.status, response.headers.get("x-request-id")
    return run()


def test_concurrency_limit_refuses_the_second_in_flight_call_and_frees_on_success(server, tenants):
    tenant, _, secret = tenants.make(tier={"max_concurrent": 1})

    async def scenario():
        first = asyncio.ensure_future(slow_stream(server.base_url, secret))
        await asyncio.sleep(0.3)
        second = await post_many([(server.base_url, secret)], {"model": "local", "messages": [{"role": "user", "content": "x"}]})
        status, _ = await first
        return second[0], status

    (second_status, second_headers), first_status = asyncio.run(scenario())
    assert first_status == 200 and second_status == 429 and int(second_headers["Retry-After"]) >= 1
    assert chat(server, secret).http_response.status_code == 200  # the slot was released


@pytest.fixture
def two_slow_settling_servers(routes):
    """Two platform processes whose settlements wait up to 50 ms (GW_REDIS_DEFER_MS) to ride
    with a later write: longer than the SDK takes between two requests."""
    servers = [Server({"GW_REDIS_DEFER_MS": "50"}) for _ in range(2)]
    try:
        yield servers
    finally:
        for one in servers:
            one.stop()


def sdk_clients(servers: list[Server], secret: str) -> list[openai.OpenAI]:
    return [openai.OpenAI(base_url=one.base_url, api_key=secret, max_retries=0, timeout=30) for one in servers]


def test_a_sequential_client_at_its_concurrency_limit_is_never_refused_across_processes(two_slow_settling_servers,
                                                                                        tenants):
    """A client that waits for each answer before sending the next never has more than one call
    in flight, so a limit of one concurrent request must never refuse it, even when a load
    balancer sends each request to another process: the finished call's slot is released before
    its answer (or its stream's end) reaches the client. Settlements otherwise wait up to
    GW_REDIS_DEFER_MS to ride with a later write: 50 ms here, longer than the SDK takes between
    two requests, so that without that ordering every other request would get 429."""
    _, _, secret = tenants.make(tier={"max_concurrent": 1})
    clients = sdk_clients(two_slow_settling_servers, secret)
    messages = [{"role": "user", "content": "hello"}]
    for i in range(40):
        client = clients[i % 2]
        if i % 4 < 2:
            assert client.chat.completions.create(model="local", messages=messages).choices[0].message.content
        else:
            chunks = list(client.chat.completions.create(model="local", messages=messages, stream=True))
            assert chunks and chunks[-1].choices[0].finish_reason == "stop"


def test_a_sequential_client_near_its_token_limit_gets_its_refunds_in_time_across_processes(two_slow_settling_servers,
                                                                                           tenants):
    """Admission reserves prompt + max_tokens; settlement refunds what was not used. A client that
    waits for each answer must find its previous call's refund applied, whichever process its next
    request reaches: here each request reserves over half the bucket and uses a few tokens, so
    without the refund before the answer every other request would get 429."""
    _, _, secret = tenants.make(tier={"tokens_per_minute": 1500, "requests_per_minute": None,
                                      "requests_per_hour": None, "max_concurrent": None})
    clients = sdk_clients(two_slow_settling_servers, secret)
    used = 0
    for i in range(12):
        answer = clients[i % 2].chat.completions.create(model="local", max_tokens=800,
                                                        messages=[{"role": "user", "content": "hi"}])
        used += answer.usage.total_tokens
    assert used < 1500 - 800  # what the calls used leaves room for one more reservation: no refusal was due


def test_slot_is_released_on_upstream_error(server, tenants, fakes_reset):
    _, _, secret = tenants.make(tier={"max_concurrent": 1})
    with pytest.raises(openai.InternalServerError):
        chat(server, secret, model="gpt-4o-mini", content="x [[fault:500]]")
    assert chat(server, secret).http_response.status_code == 200


def test_slot_is_released_when_the_client_hangs_up_mid_stream(server, tenants):
    tenant, _, secret = tenants.make(tier={"max_concurrent": 1})
    asyncio.run(slow_stream(server.base_url, secret, hang_up_after=2))
    deadline = time.monotonic() + 2
    while get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc"):
        assert time.monotonic() < deadline, "slot still held after the client left"
        time.sleep(0.05)
    assert chat(server, secret).http_response.status_code == 200


def test_slot_of_a_killed_worker_expires_by_itself(routes, server, tenants):
    tenant, _, secret = tenants.make(tier={"max_concurrent": 1})
    doomed = Server({"GW_SLOT_TTL_SECONDS": "1.5"})

    async def scenario():
        stream = asyncio.ensure_future(slow_stream(doomed.base_url, secret))
        await asyncio.sleep(0.4)
        doomed.stop(signal.SIGKILL)
        try:
            await stream
        except aiohttp.ClientError:
            pass

    asyncio.run(scenario())
    assert get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc") == 1  # the dead worker's slot
    with pytest.raises(openai.RateLimitError):
        chat(server, secret)
    time.sleep(1.6)
    assert chat(server, secret).http_response.status_code == 200


def test_a_call_that_outlives_the_slot_ttl_keeps_its_slot(routes, tenants):
    tenant, _, secret = tenants.make(tier={"max_concurrent": 1})
    brief = Server({"GW_SLOT_TTL_SECONDS": "0.6"})  # the heartbeat renews every 0.2 s

    async def scenario():
        started = time.monotonic()
        stream = asyncio.ensure_future(slow_stream(brief.base_url, secret, length=40))
        await asyncio.sleep(1.5)  # 2.5 TTLs into the call
        held = get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc")
        (second, _), = await post_many([(brief.base_url, secret)], {"model": "local", "messages": [{"role": "user", "content": "x"}]})
        first, _ = await stream
        return held, second, first, time.monotonic() - started

    try:
        held, second, first, took = asyncio.run(scenario())
    finally:
        brief.stop()
    assert took > 1.6, "the slow call ended too soon to prove anything"
    assert held == 1 and second == 429 and first == 200
    assert get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc") == 0


def test_a_process_serves_from_leases_and_gives_them_back_when_it_stops(routes, tenants):
    tenant, _, secret = tenants.make(tier=BIG)
    # Leases idle for a tenth of this are given back: long enough for a slow first call (lazy
    # imports) on a busy machine, so that the next call finds the lease still there.
    own = Server(extra_env={"GW_LIMITS_LEASE_SECONDS": "10"})
    slot_set = f"gw:{{t{tenant.pk}}}:conc"
    try:
        answers = [chat(own, secret) for _ in range(10)]
        held = get_redis().zrange(slot_set, 0, -1)
    finally:
        own.stop()  # SIGTERM: the lifespan's shutdown gives the leases back
    remaining = [int(answer.headers["x-ratelimit-remaining-requests"]) for answer in answers]
    assert remaining[0] == 99_999 and all(a > b for a, b in zip(remaining, remaining[1:], strict=False)), remaining
    assert held and all(b"~" in member for member in held)  # a lease's slots, not requests'
    assert get_redis().zcard(slot_set) == 0
    drain_usage()
    for answer in answers:  # every call settled into the lease still has its row
        assert usage_row(answer.headers["x-request-id"]).http_status == 200


def test_two_processes_admit_exactly_the_limit_out_of_a_burst(routes, server, tenants):
    n = 20
    _, _, secret = tenants.make(tier={"requests_per_minute": n, "requests_per_hour": None, "tokens_per_minute": None})
    other = Server()
    try:
        targets = [(server.base_url if i % 2 else other.base_url, secret) for i in range(3 * n)]
        started = time.monotonic()
        results = asyncio.run(post_many(targets, {"model": "local", "messages": [{"role": "user", "content": "x"}]}))
        elapsed = time.monotonic() - started
    finally:
        other.stop()
    admitted = sum(status == 200 for status, _ in results)
    refilled = int(elapsed * n / 60)
    assert {status for status, _ in results} <= {200, 429}
    assert n <= admitted <= n + refilled, (admitted, elapsed)


def test_two_processes_serving_from_leases_admit_no_more_than_the_limit_and_lose_none(routes, server, tenants):
    """A limit large enough for leases (N/64 = 16 requests each): a burst of 3N spread over two
    servers admits at most N (plus the refill); once their leases are back (one server stops,
    the other's goes idle), sequential calls take what is left, to N in all."""
    n = 1024
    _, _, secret = tenants.make(tier={**BIG, "requests_per_minute": n, "max_concurrent": None})
    other = Server()
    body = {"model": "local", "messages": [{"role": "user", "content": "x"}]}
    started = time.monotonic()
    try:
        results = asyncio.run(post_many([(server.base_url if i % 2 else other.base_url, secret)
                                         for i in range(3 * n)], body))
        leased = sum(int(headers.get("x-ratelimit-remaining-requests", -1)) > n // 2 for _, headers in results)
    finally:
        other.stop()  # SIGTERM: gives its lease back
    time.sleep(0.3)  # the other server's lease, idle: given back too
    more = 0
    while True:
        try:
            chat(server, secret)
        except openai.RateLimitError:
            break
        more += 1
    refilled = (time.monotonic() - started) * n / 60
    burst = sum(status == 200 for status, _ in results)
    assert {status for status, _ in results} <= {200, 429}
    assert leased > n // 4  # the first half of the bucket went mostly to leases
    assert burst <= n + refilled and n <= burst + more <= n + refilled + 1, (burst, more, refilled)


def test_daily_budget_refuses_with_insufficient_quota_and_alerts_once(server, tenants, fakes_reset):
    from billing.models import BudgetAlert

    tenant, _, secret = tenants.make(tier={"daily_budget_usd": "0.0001", "monthly_budget_usd": None})
    statuses = []
    for _ in range(60):
        try:
            statuses.append(chat(server, secret, model="gpt-4o-mini", content="spend some money", max_tokens=10).http_response.status_code)
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "insufficient_quota" and exc.body["type"] == "insufficient_quota"
            statuses.append(429)
            break
    assert statuses[-1] == 429 and statuses[:-1] == [200] * (len(statuses) - 1) and len(statuses) > 2
    drain_usage()
    alerts = list(BudgetAlert.objects.filter(tenant=tenant).values_list("scope", "threshold"))
    assert ("tenant", 80) in alerts and alerts.count(("tenant", 80)) == 1


def test_spend_of_an_earlier_day_does_not_count_today(server, tenants, fakes_reset):
    tenant, _, secret = tenants.make(tier={"daily_budget_usd": "0.01", "monthly_budget_usd": "100"})
    budget_hash = f"gw:{{t{tenant.pk}}}:lim"
    chat(server, secret, model="gpt-4o-mini", content="first", max_tokens=10)
    # Yesterday (as far as the counter knows) the tenant spent 100x today's cap, with alerts raised.
    get_redis().hset(budget_hash, mapping={"d": 10**12, "d:p": "2000-01-01", "d:a": 100})
    response = chat(server, secret, model="gpt-4o-mini", content="second", max_tokens=10)
    assert response.http_response.status_code == 200
    state = {k.decode(): v.decode() for k, v in get_redis().hgetall(budget_hash).items()}
    assert state["d:p"] == datetime.now(UTC).strftime("%Y-%m-%d")
    assert 0 < int(state["d"]) < 10**12 and state["d:a"] == "0"  # today counts from nothing
    assert int(state["m"]) > int(state["d"])  # the month kept the first call's spend too


def test_a_tenant_without_limits_is_served_and_its_usage_recorded(server, tenants, committed_db):
    unlimited = dict.fromkeys(("requests_per_minute", "requests_per_hour", "tokens_per_minute", "max_concurrent",
                               "daily_budget_usd", "monthly_budget_usd"))
    tenant, _, secret = tenants.make(tier=unlimited)
    response = chat(server, secret)
    assert response.http_response.status_code == 200
    assert not any(name.startswith("x-ratelimit-") for name in response.headers)
    row = usage_row(response.headers["x-request-id"])
    assert row.tenant_id == tenant.pk and row.completion_tokens > 0


def test_key_override_limits_only_that_key(server, tenants):
    from tenants.models import ApiKey

    tenant, key, secret = tenants.make()
    key.requests_per_minute = 1
    key.save()
    _, other_secret = ApiKey.issue(tenant)
    time.sleep(1.1)  # local caches (1 s in tests) forget the old principal
    assert chat(server, secret).http_response.status_code == 200
    with pytest.raises(openai.RateLimitError) as caught:
        chat(server, secret)
    assert "this API key" in caught.value.body["message"]
    assert chat(server, other_secret).http_response.status_code == 200


def test_repeated_bad_keys_from_one_address_get_429(routes):
    from django_ratelimit.core import _get_window

    throttled = Server({"GW_BAD_KEY_RATE": "3/m"})
    try:
        # django-ratelimit counts in fixed windows (each address's own minute): five requests
        # straddling its end would count anew. Start them well inside one.
        left = _get_window("127.0.0.1", 60) - time.time()
        if left < 10:
            time.sleep(left + 0.5)
        statuses = []
        for _ in range(5):
            try:
                chat(throttled, "sk-gw-" + "z" * 43)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
        assert statuses[:3] == [401, 401, 401] and statuses[3:] == [429, 429]
    finally:
        throttled.stop()


@pytest.mark.parametrize("tier", [{}, {"max_concurrent": 1}, BIG],
                         ids=["deferred-settlement", "settled-before-the-end", "admitted-from-a-lease"])
def test_redis_outage_is_a_fast_503_and_recovers_without_losing_rows(routes, tenants, tmp_path, tier):
    """A private Redis for this server: stop it mid-stream, then bring it back on the same port.
    With a limit of one concurrent call, the stream's settlement is written before its end
    (at once, not deferred); far from every limit, the stream is admitted from the process's
    lease and settled into it: its row must survive the outage just the same."""
    import redis as redis_lib
    from django.conf import settings as django_settings

    from llm_platform.embedded import EmbeddedRedis

    tenant, _, secret = tenants.make(tier=tier)
    store = EmbeddedRedis(tmp_path / "redis", persist=False)
    url = store.start()
    server = Server({"REDIS_URL": url})
    try:
        async def outage():
            if tier is BIG:
                await post_many([(server.base_url, secret)], {"model": "local", "messages": [{"role": "user", "content": "x"}]})
            stream = asyncio.ensure_future(slow_stream(server.base_url, secret))
            await asyncio.sleep(0.3)
            if tier is BIG:  # the stream runs on the lease the first call took: only its slots are held
                held = redis_lib.Redis.from_url(url).zrange(f"gw:{{t{tenant.pk}}}:conc", 0, -1)
                assert held and all(b"~" in member for member in held)
            store.stop()
            return await stream

        status, request_id = asyncio.run(outage())
        assert status == 200  # the call in flight finished
        time.sleep(1.2)  # let the key cache expire so authentication needs Redis too
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            chat(server, secret)
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"]
        assert time.monotonic() - started < 3
        restarted = EmbeddedRedis(tmp_path / "redis", port=store.port, persist=False)
        restarted.start()
        store = restarted
        deadline = time.monotonic() + 10
        while True:
            try:
                assert chat(server, secret).http_response.status_code == 200
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline, "did not recover after Redis came back"
                time.sleep(0.2)

        def buffered_ids():
            rows = redis_lib.Redis.from_url(url).xrange(django_settings.GATEWAY["USAGE_STREAM"])
            return {json.loads(fields[b"row"])["request_id"] for _, fields in rows}

        deadline = time.monotonic() + 5
        while request_id not in buffered_ids():  # the row settled during the outage is re-sent
            assert time.monotonic() < deadline, "the row settled during the outage was lost"
            time.sleep(0.2)
    finally:
        server.stop()
        store.stop()
