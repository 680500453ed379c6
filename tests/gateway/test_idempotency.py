"""Idempotency-Key on POST /v1/chat/completions: one provider call per key, free replays."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import aiohttp
import openai

from tests.conftest import clear_lane_health, drain_usage
from tests.gateway.test_openai_upstream import sse_events

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "idempotent hello"}]}
SLOW_STREAM = {"model": "local-slow", "stream": True, "messages": [{"role": "user", "content": "tell me a long story " * 5}]}


def new_key() -> str:
    return f"idem-{uuid.uuid4()}"


def headers(secret: str, key: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {secret}"}
    if key is not None:
        out["Idempotency-Key"] = key
    return out


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        return json.loads(self.content)


def post(server, secret: str, body: dict, key: str | None = None) -> Reply:
    request = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={**headers(secret, key), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def provider_calls(fake_openai) -> int:
    return sum(1 for r in fake_openai.requests if r.path == "/v1/chat/completions")


def usage_rows(tenant) -> int:
    from billing.models import UsageRecord

    drain_usage()
    return UsageRecord.objects.filter(tenant=tenant).count()


def test_twenty_concurrent_duplicates_make_one_provider_call(server, tenant, fake_openai, fakes_reset):
    fake_openai.delay = 0.5
    key = new_key()

    async def run():
        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(f"{server.base_url}/chat/completions", headers=headers(tenant[2], key),
                                        json=BODY) as response:
                    return response.status, await response.read(), {k.lower(): v for k, v in response.headers.items()}
            return await asyncio.gather(*(one() for _ in range(20)))

    results = asyncio.run(run())
    assert [status for status, _, _ in results] == [200] * 20
    assert len({body for _, body, _ in results}) == 1
    assert provider_calls(fake_openai) == 1
    originals = [h for _, _, h in results if "x-idempotent-replayed" not in h]
    replays = [h for _, _, h in results if h.get("x-idempotent-replayed") == "true"]
    assert len(originals) == 1 and len(replays) == 19
    assert {h["x-original-request-id"] for h in replays} == {originals[0]["x-request-id"]}
    assert all(h["x-request-id"] != originals[0]["x-request-id"] for h in replays)
    assert json.loads(results[0][1])["choices"][0]["message"]["content"].startswith("Echo: idempotent hello")


def test_replay_after_completion_is_free_and_byte_identical(server, tenants, fake_openai, fakes_reset, committed_db):
    tenant, _, secret = tenants.make(tier={"requests_per_minute": 1})
    key = new_key()
    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0, timeout=20)
    first = client.chat.completions.with_raw_response.create(**BODY, extra_headers={"Idempotency-Key": key})
    assert first.status_code == 200 and "x-idempotent-replayed" not in first.headers
    original = first.http_response.read()
    for _ in range(5):  # a 1-request-per-minute tenant: none of these is admitted, none needs to be
        again = post(server, secret, BODY, key)
        assert again.status_code == 200, again.text
        assert again.content == original
        assert again.headers["x-idempotent-replayed"] == "true"
        assert again.headers["x-original-request-id"] == first.headers["x-request-id"]
        assert again.headers["x-upstream-model"] == first.headers["x-upstream-model"]
        assert again.headers["x-ratelimit-limit-requests"] == first.headers["x-ratelimit-limit-requests"]
    replayed = client.chat.completions.create(**BODY, extra_headers={"Idempotency-Key": key})
    assert replayed.id == first.parse().id
    assert post(server, secret, BODY).status_code == 429  # without the key the limit applies
    assert provider_calls(fake_openai) == 1
    assert usage_rows(tenant) == 1


def test_same_key_with_another_body_is_422_at_once_whatever_the_state(server, tenant, fake_openai, fakes_reset):
    fake_openai.delay = 1.0
    key = new_key()
    other = {**BODY, "messages": [{"role": "user", "content": "something else"}]}

    async def run():
        async with aiohttp.ClientSession() as session:
            url = f"{server.base_url}/chat/completions"
            first = asyncio.ensure_future(session.post(url, headers=headers(tenant[2], key), json=BODY))
            await asyncio.sleep(0.3)
            started = time.perf_counter()
            async with session.post(url, headers=headers(tenant[2], key), json=other) as response:
                running = response.status, await response.json(), time.perf_counter() - started
            async with await first as response:
                assert response.status == 200
                await response.read()
            async with session.post(url, headers=headers(tenant[2], key), json=other) as response:
                done = response.status, await response.json()
            return running, done

    (status, body, took), (status_done, body_done) = asyncio.run(run())
    assert status == 422 and took < 0.5
    assert body["error"]["code"] == "idempotency_key_reused" and body["error"]["param"] == "Idempotency-Key"
    assert status_done == 422 and body_done["error"]["code"] == "idempotency_key_reused"
    assert provider_calls(fake_openai) == 1


def test_a_failed_first_attempt_releases_the_key(server, tenant, fake_openai, fakes_reset):
    key = new_key()
    fake_openai.fault, fake_openai.fault_times = "500", 100  # every attempt of the platform's retries fails
    failed = post(server, tenant[2], BODY, key)
    assert failed.status_code == 502
    failed_calls = provider_calls(fake_openai)
    assert failed_calls >= 1
    fake_openai.fault, fake_openai.fault_times = None, None
    clear_lane_health()  # the failures may have opened the lane's breaker
    retried = post(server, tenant[2], BODY, key)
    assert retried.status_code == 200 and "x-idempotent-replayed" not in retried.headers
    assert provider_calls(fake_openai) == failed_calls + 1
    replayed = post(server, tenant[2], BODY, key)
    assert replayed.headers["x-idempotent-replayed"] == "true" and replayed.content == retried.content
    assert provider_calls(fake_openai) == failed_calls + 1


def test_a_duplicate_takes_over_when_the_first_client_leaves(server, tenant, fake_openai, fakes_reset):
    """The first caller hangs up (its call is cancelled, the key released); the waiting retry runs."""
    fake_openai.delay = 1.0
    key = new_key()

    async def run():
        async with aiohttp.ClientSession() as session:
            url = f"{server.base_url}/chat/completions"
            first = asyncio.ensure_future(session.post(url, headers=headers(tenant[2], key), json=BODY))
            await asyncio.sleep(0.2)
            second = asyncio.ensure_future(session.post(url, headers=headers(tenant[2], key), json=BODY))
            await asyncio.sleep(0.2)
            first.cancel()  # the first client gives up
            async with await second as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}

    status, got = asyncio.run(run())
    assert status == 200 and "x-idempotent-replayed" not in got
    assert provider_calls(fake_openai) == 2


def test_a_claim_left_running_by_a_dead_process_expires(server, tenant, fake_openai, fakes_reset):
    from gateway.idempotency import fingerprint, redis_key
    from llm_platform.redis import get_redis

    key = new_key()
    stale = json.dumps({"state": "running", "fp": fingerprint(BODY), "rid": "req_dead", "stream": False})
    get_redis().set(redis_key(tenant[0].id, key), stale, px=600)  # its lease runs out in 0.6 s
    started = time.perf_counter()
    response = post(server, tenant[2], BODY, key)
    assert response.status_code == 200 and "x-idempotent-replayed" not in response.headers
    assert 0.4 < time.perf_counter() - started < 5
    assert provider_calls(fake_openai) == 1


async def _read_stream(session, url, secret, key, body, stop_after: int | None = None):
    response = await session.post(url, headers=headers(secret, key), json=body)
    if stop_after is None:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, (await response.read()).decode()
    seen = 0
    async for line in response.content:
        if line.startswith(b"data: "):
            seen += 1
            if seen == stop_after:
                break
    return response


def _check_frames(text: str) -> list[tuple[int, str]]:
    events = sse_events(text)
    assert events and all(ident is not None for ident, _ in events)  # every frame carries id:
    assert [ident for ident, _ in events] == list(range(1, len(events) + 1))
    assert events[-1][1] == "[DONE]"
    return events


def _text_of(events) -> str:
    out = ""
    for _, data in events[:-1]:
        for choice in json.loads(data)["choices"]:
            out += choice["delta"].get("content") or ""
    return out


def test_a_stream_duplicate_attaches_and_a_later_one_replays(server, tenants, committed_db):
    tenant, _, secret = tenants.make()
    key = new_key()
    url = f"{server.base_url}/chat/completions"

    async def run():
        async with aiohttp.ClientSession() as session:
            first = await session.post(url, headers=headers(secret, key), json=SLOW_STREAM)
            assert first.status == 200
            first_id = first.headers["x-request-id"]
            first_part = b""
            async for line in first.content:  # the first stream is under way ...
                first_part += line
                if first_part.count(b"data: ") == 3:
                    break
            # ... when its duplicate arrives and attaches
            second = asyncio.ensure_future(_read_stream(session, url, secret, key, SLOW_STREAM))
            first_text = (first_part + await first.read()).decode()
            attached = await second
            replayed = await _read_stream(session, url, secret, key, SLOW_STREAM)
            return first_id, first_text, attached, replayed

    first_id, first_text, (status, got, attached_text), (status_r, got_r, replayed_text) = asyncio.run(run())
    original = _check_frames(first_text)
    assert len(original) > 10 and _text_of(original).startswith("Hello from the built-in local model")
    assert status == 200 and got["content-type"].startswith("text/event-stream")
    assert got["x-idempotent-replayed"] == "true" and got["x-original-request-id"] == first_id
    assert got["x-stream-id"] == first_id and got["x-request-id"] != first_id
    assert _check_frames(attached_text) == original
    assert status_r == 200 and got_r["x-idempotent-replayed"] == "true"
    assert _check_frames(replayed_text) == original
    assert usage_rows(tenant) == 1  # one generation, billed once


def test_a_completed_stream_whose_events_expired_is_409(server, tenant, fakes_reset):
    from llm_platform.redis import get_redis

    key = new_key()
    body = {**SLOW_STREAM, "model": "local"}
    first = post(server, tenant[2], body, key)
    assert first.status_code == 200 and _check_frames(first.text)
    get_redis().delete(f"gw:{{t{tenant[0].id}}}:stream:{first.headers['x-request-id']}")
    again = post(server, tenant[2], body, key)
    assert again.status_code == 409 and again.json()["error"]["code"] == "idempotency_stream_expired"


def test_requests_without_the_key_are_unaffected(server, tenant, fake_openai, fakes_reset):
    first, second = post(server, tenant[2], BODY), post(server, tenant[2], BODY)
    assert first.status_code == second.status_code == 200
    assert "x-idempotent-replayed" not in first.headers and "x-idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]
    assert provider_calls(fake_openai) == 2


def test_an_invalid_key_is_400(server, tenant, fake_openai, fakes_reset):
    for bad in ("x" * 256, "tab\there", ""):
        response = post(server, tenant[2], BODY, bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] == "Idempotency-Key"
    assert post(server, tenant[2], BODY, "y" * 255).status_code == 200
    assert provider_calls(fake_openai) == 1
