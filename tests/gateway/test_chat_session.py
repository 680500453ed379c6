"""The chat session without HTTP: what a WebSocket consumer or a Celery task will call.

A scripted provider (registered like any provider kind) stands in for the vendor, so each test
controls exactly when chunks arrive; PostgreSQL and Redis are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import orjson
import pytest

from gateway.chat import CancelToken, ChatSession, run_cancellable
from gateway.chat.cancel import STOPPED
from gateway.errors import GatewayError
from gateway.providers.base import Provider, register_provider
from gateway.types import ChatRequest, Chunk, Completion, Usage
from llm_platform.redis import get_redis
from tests.conftest import drain_usage, usage_row

WORDS = ["alpha ", "beta ", "gamma ", "delta ", "epsilon"]


class Scripted(Provider):
    """Streams WORDS one chunk at a time; each chunk waits for `gate` when one is set."""

    gate: asyncio.Event | None = None
    calls = 0
    cancelled = 0

    def _chunk(self, obj: dict, outcome, usage_only: bool = False) -> Chunk:
        return Chunk(raw=orjson.dumps(obj), obj=obj, usage_only=usage_only)

    async def complete(self, lane, req, outcome) -> Completion:
        Scripted.calls += 1
        text = "".join(WORDS)
        outcome.usage = Usage(prompt_tokens=7, completion_tokens=len(WORDS))
        outcome.finish_reason = "stop"
        return Completion(obj={"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "scripted",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                            "finish_reason": "stop"}],
                               "usage": outcome.usage.to_openai()})

    async def stream(self, lane, req, outcome):
        Scripted.calls += 1
        base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "scripted"}
        try:
            for i, word in enumerate(WORDS):
                if Scripted.gate is not None:
                    await Scripted.gate.wait()
                    Scripted.gate.clear()
                outcome.first_token_at = outcome.first_token_at or 1.0
                outcome.completion_text_parts.append(word)
                last = i == len(WORDS) - 1
                if last:
                    outcome.finish_reason = "stop"
                yield self._chunk({**base, "choices": [{"index": 0, "delta": {"content": word},
                                                        "finish_reason": "stop" if last else None}]}, outcome)
            outcome.usage = Usage(prompt_tokens=7, completion_tokens=len(WORDS))
            yield self._chunk({**base, "choices": [], "usage": outcome.usage.to_openai()}, outcome, usage_only=True)
        except (asyncio.CancelledError, GeneratorExit):
            Scripted.cancelled += 1
            raise


@pytest.fixture()
def scripted(tenants):
    from gateway.models import Lane, ModelRoute
    from gateway.routing import routes

    register_provider("scripted", Scripted)
    Scripted.gate, Scripted.calls, Scripted.cancelled = None, 0, 0
    route = ModelRoute.objects.create(model=f"scripted-{uuid.uuid4().hex[:6]}")
    Lane.objects.create(route=route, position=0, provider="scripted", upstream_model="scripted",
                        context_window=8000, price_input="1", price_output="2")
    routes.__init__()  # a fresh table: this process reads the new route at once
    yield route.model
    route.delete()
    routes.__init__()
    close_thread_connections()


def close_thread_connections() -> None:
    """The ORM calls these tests make off the event loop hold connections in the ORM threads:
    close them, so the test database can be dropped."""
    from llm_platform.db import close_connections

    close_connections()


async def _principal(secret: str):
    from tenants.auth import authenticate

    return await authenticate(secret)


def _request(model: str, stream: bool) -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": "count for me"}], stream=stream,
                       include_usage=True)


async def _collect(session: ChatSession) -> list:
    async with contextlib.aclosing(session.events()) as events:
        return [event async for event in events]


def test_a_streamed_call_yields_start_deltas_usage_and_finish_in_order(tenants, scripted):
    _, _, secret = tenants.make()

    async def scenario():
        principal = await _principal(secret)
        return await _collect(ChatSession(principal, _request(scripted, True), call_id=f"req_{uuid.uuid4().hex}",
                                          front_door="test"))

    events = asyncio.run(scenario())
    kinds = [e.kind for e in events]
    assert kinds == ["start", *["delta"] * (len(WORDS) + 1), "finish"]
    deltas = events[1:-1]
    assert "".join(c.text for d in deltas for c in d.choices()) == "".join(WORDS)
    assert [d.seq for d in deltas] == list(range(1, len(WORDS) + 2))
    assert deltas[-1].usage_only and deltas[-1].usage.completion_tokens == len(WORDS)
    assert events[-1].finish_reason == "stop" and events[-1].seq == len(WORDS) + 2
    assert events[0].provider == "scripted" and any(k == b"x-ratelimit-limit-requests" for k, _ in events[0].headers)


def test_a_whole_answer_comes_as_start_completed_finish_with_its_usage_row(tenants, scripted):
    _, _, secret = tenants.make()
    call_id = f"req_{uuid.uuid4().hex}"

    async def scenario():
        principal = await _principal(secret)
        return await _collect(ChatSession(principal, _request(scripted, False), call_id=call_id, front_door="test"))

    events = asyncio.run(scenario())
    assert [e.kind for e in events] == ["start", "completed", "finish"]
    (choice,) = events[1].completion.choices()
    assert choice.text == "".join(WORDS) and choice.finish_reason == "stop"
    row = usage_row(call_id)
    assert row.front_door == "test" and row.http_status == 200 and row.completion_tokens == len(WORDS)


def test_the_cancel_token_stops_the_upstream_call_releases_the_slot_and_records_a_partial_row(tenants, scripted):
    tenant, _, secret = tenants.make(tier={"max_concurrent": 3})  # small: the exact per-request slots
    call_id = f"req_{uuid.uuid4().hex}"
    slots = f"gw:{{t{tenant.pk}}}:conc"

    async def scenario():
        principal = await _principal(secret)
        Scripted.gate = asyncio.Event()
        token = CancelToken()
        session = ChatSession(principal, _request(scripted, True), call_id=call_id, front_door="test", cancel=token)
        seen: list = []
        held_while_running: list = []

        async def consume():
            async with contextlib.aclosing(session.events()) as events:
                async for event in events:
                    seen.append(event)
                    if event.kind == "delta" and len(seen) == 3:
                        held_while_running.append(get_redis().zcard(slots))
                        token.cancel(STOPPED)  # what a Stop button does, from any task
                    else:
                        Scripted.gate.set()  # let the provider send its next chunk

        Scripted.gate.set()
        result = await run_cancellable(token, consume())
        await asyncio.sleep(0.05)  # the settlement runs in its own (shielded) task
        return result, seen, held_while_running

    result, seen, held = asyncio.run(scenario())
    assert result is None and Scripted.cancelled == 1
    assert [e.kind for e in seen] == ["start", "delta", "delta"]
    assert held == [1]
    drain_usage()
    row = usage_row(call_id)
    assert row.http_status == 499 and row.error_code == "stopped" and row.partial
    assert row.prompt_tokens > 0 and row.completion_tokens > 0
    assert get_redis().zcard(slots) == 0


def test_a_door_that_stops_reading_counts_as_a_client_gone(tenants, scripted):
    tenant, _, secret = tenants.make(tier={"max_concurrent": 3})
    call_id = f"req_{uuid.uuid4().hex}"

    async def scenario():
        principal = await _principal(secret)
        session = ChatSession(principal, _request(scripted, True), call_id=call_id, front_door="test")
        async with contextlib.aclosing(session.events()) as events:
            async for event in events:
                if event.kind == "delta":
                    break  # e.g. the socket write failed
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    row = usage_row(call_id)
    assert row.http_status == 499 and row.error_code == "client_disconnected" and row.partial
    assert get_redis().zcard(f"gw:{{t{tenant.pk}}}:conc") == 0


def test_an_unknown_model_is_raised_before_start(tenants, scripted):
    _, _, secret = tenants.make()

    async def scenario():
        principal = await _principal(secret)
        await _collect(ChatSession(principal, _request("no-such-model", True), call_id="req_x", front_door="test"))

    with pytest.raises(GatewayError) as caught:
        asyncio.run(scenario())
    assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_kept_events_replay_through_the_idempotency_key_without_a_second_call(tenants, scripted):
    _, _, secret = tenants.make()

    async def scenario():
        principal = await _principal(secret)
        runs = []
        for _ in range(2):
            session = ChatSession(principal, _request(scripted, True), call_id=f"req_{uuid.uuid4().hex}",
                                  front_door="test", idempotency_key="k-1", fingerprint="fp-1")
            runs.append(await _collect(session))
        return runs

    first, second = asyncio.run(scenario())
    assert Scripted.calls == 1
    assert second[0].replayed and second[0].original_call_id == first[0].call_id
    assert [e.kind for e in second] == [e.kind for e in first]
    assert [bytes(e.data) for e in second if e.kind == "delta"] == [bytes(e.data) for e in first if e.kind == "delta"]
