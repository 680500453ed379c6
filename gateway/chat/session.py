"""The chat session: one call of the chat service, whatever front door asked for it.

    session = ChatSession(principal, req, call_id=..., front_door="openai",
                          idempotency_key=key, fingerprint=fp, keep_events=True, cancel=token)
    async with contextlib.aclosing(session.events()) as events:
        async for event in events:          # Start, Delta... | Completed, Finish | Failed
            ...render it in the door's wire format...

The session owns what no front door may write twice: admission and settlement, routing and the
resilience ladder (through `open_call`), idempotency (claim the key, or wait for / follow /
replay the call that holds it), the resumable event store, structured-output validation of
streams (whole answers are validated and repaired inside the call), and cancellation (a
`CancelToken`; a door that stops iterating counts as its client having left). A failure before
`Start` is raised as a `GatewayError`; after it, it is a `Failed` event.

The prompts issue resolves a stored prompt into `req` in `prepare` (the hook every door already
goes through), before routing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from django.conf import settings

from llm_platform.runtime import Runtime
from tenants.principal import Principal

from .. import idempotency
from ..errors import GatewayError
from ..structured import StreamChecker
from ..types import ChatRequest, Completion
from . import store
from .call import CallContext, ChatCall, open_call
from .cancel import SHUTDOWN, CancelToken
from .events import Completed, Failed, Finish, Start

ATTACH_POLL_S = 1.0  # a duplicate attached to a running stream checks on its producer this often
REPLAYED = b"x-idempotent-replayed"
ORIGINAL = b"x-original-request-id"


async def prepare(principal: Principal, req: ChatRequest) -> ChatRequest:
    """The hook where a stored prompt reference becomes messages and parameters (the prompts
    issue fills it); today the request goes through as it is."""
    return req


class _Claimed:
    """What an idempotency claim keeps when its call succeeds."""

    __slots__ = ("success", "headers", "body")

    def __init__(self) -> None:
        self.success = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""


class ChatSession:
    __slots__ = ("principal", "req", "call_id", "front_door", "cancel", "idempotency_key", "fingerprint",
                 "keep_events", "_retry")

    def __init__(self, principal: Principal, req: ChatRequest, *, call_id: str, front_door: str,
                 cancel: CancelToken | None = None, idempotency_key: str | None = None,
                 fingerprint: str | None = None, keep_events: bool = False) -> None:
        self.principal = principal
        self.req = req
        self.call_id = call_id
        self.front_door = front_door
        self.cancel = cancel or CancelToken()
        self.idempotency_key = idempotency_key
        self.fingerprint = fingerprint
        # Keep a stream's events for resume (and for Idempotency-Key followers, always).
        self.keep_events = req.stream and settings.GATEWAY["STREAM_RESUME_ENABLED"] and (
            keep_events or idempotency_key is not None)
        self._retry = False

    async def complete(self, deliver) -> None:
        """A whole answer (`req.stream` false), handed to `await deliver(start, completion)` before
        the call settles (the client gets it first), without the event machinery of `events()`:
        the same call underneath, in a coroutine, which costs less per request."""
        if self.idempotency_key is not None:
            events = self._idempotent()
            try:
                async for event in events:
                    if event.kind == "start":
                        start = event
                    elif event.kind == "completed":
                        await deliver(start, event.completion)
            finally:
                await events.aclose()
            return
        token = self.cancel
        if token._task is None:
            token.bind()
        runtime = Runtime.current()
        active = runtime.active
        active.add(token)
        try:
            self.req = await prepare(self.principal, self.req)
            ctx = CallContext(self.call_id, self.front_door, cancel=token, runtime=runtime)
            async with open_call(self.principal, self.req, ctx) as call:
                try:
                    completion = await call.complete()
                except asyncio.CancelledError:
                    raise _ended_by_server(token) from None
                await deliver(self._start(call, None), completion)
        finally:
            active.discard(token)

    def events(self) -> AsyncIterator:
        """The call's events (see gateway/chat/events.py); close it when done (`aclosing`)."""
        if self.idempotency_key is None:
            return self._run(None)
        return self._idempotent()

    # -- one call ------------------------------------------------------------------------------

    def _start(self, call: ChatCall, stream_id: str | None) -> Start:
        return Start(self.call_id, self.req.model, call.outcome.upstream_model or call.lane.upstream_model,
                     call.lane.provider, call.response_headers(), stream_id, prompt_tokens=call.prompt_tokens)

    async def _run(self, claimed: _Claimed | None):
        token = self.cancel
        if token._task is None:
            token.bind()  # the task consuming these events
        runtime = Runtime.current()
        active = runtime.active  # a deploy ends the calls still running (`end_calls`)
        active.add(token)
        try:
            self.req = await prepare(self.principal, self.req)
            ctx = CallContext(self.call_id, self.front_door, cancel=token, runtime=runtime)
            async with open_call(self.principal, self.req, ctx) as call:
                if not self.req.stream:
                    try:
                        completion = await call.complete()
                    except asyncio.CancelledError:
                        raise _ended_by_server(token) from None
                    start = self._start(call, None)
                    yield start
                    yield Completed(completion)
                    if claimed is not None:  # the door has rendered it: keep it for replays
                        claimed.success, claimed.headers, claimed.body = True, start.headers, completion.data
                    yield Finish(0, call.outcome.usage, call.outcome.finish_reason)
                    return
                chunks = call.stream()
                # The first chunk decides the status: a provider refusal before it is raised.
                try:
                    first = await anext(chunks)
                except StopAsyncIteration:
                    first = None
                except asyncio.CancelledError:
                    raise _ended_by_server(token) from None
                writer = store.StreamWriter(self.principal.tenant_id, self.call_id) if self.keep_events else None
                checker = StreamChecker(call.schema) if call.schema is not None else None
                start = self._start(call, self.call_id if writer is not None else None)
                yield start
                seq = 0
                try:
                    if first is not None:
                        seq = first.seq = writer.add(first.data) if writer is not None else 1
                        if checker is not None:
                            checker.feed(first.as_dict)
                        yield first
                        async for chunk in chunks:
                            seq = chunk.seq = writer.add(chunk.data) if writer is not None else seq + 1
                            if checker is not None:
                                checker.feed(chunk.as_dict)
                            yield chunk
                    problem = checker.problem() if checker is not None else None
                    if problem is not None:
                        raise GatewayError(502, f"The model's output did not match the requested JSON schema: {problem}",
                                           type="server_error", code="structured_output_invalid")
                except (GatewayError, asyncio.CancelledError) as caught:
                    exc = caught if isinstance(caught, GatewayError) else _ended_by_server(token)
                    # After Start the door has sent its status: the answer ends with an error event.
                    call.fail(exc)
                    call.partial = True
                    if writer is not None:
                        await writer.finish(exc)
                    yield Failed(exc, seq + 1)
                    return
                if writer is not None:
                    await writer.finish()
                if claimed is not None:
                    claimed.success, claimed.headers = True, start.headers
                yield Finish(seq + 1, call.outcome.usage, call.outcome.finish_reason)
        finally:
            active.discard(token)

    # -- Idempotency-Key: one provider call per key ----------------------------------------------

    async def _idempotent(self):
        """Run the call if we claim the key; else wait for, follow or replay the call that has it."""
        key, tenant_id = self.idempotency_key, self.principal.tenant_id
        deadline = time.monotonic() + idempotency.wait_limit_s()
        while True:
            claim, record = await idempotency.claim(tenant_id, key, self.fingerprint, self.call_id, self.req.stream)
            if claim is not None:
                claimed = _Claimed()
                claim.keep_alive()
                try:
                    async for event in self._run(claimed):
                        yield event
                finally:
                    await claim.finish(claimed.success, claimed.headers, claimed.body)
                return
            self._retry = False
            if record.stream:
                if not settings.GATEWAY["STREAM_RESUME_ENABLED"]:
                    raise GatewayError(409, "A streamed request with this Idempotency-Key exists, but stream events are "
                                            "not kept on this platform (GW_STREAM_RESUME_ENABLED is off), so it cannot "
                                            "be replayed.", code="idempotency_stream_unavailable", param=idempotency.PARAM)
                async for event in self._follow_stream(record, deadline):
                    yield event
            else:
                if record.state != "done":
                    record = await idempotency.wait_done(tenant_id, key, self.fingerprint, deadline)
                if record is not None:
                    yield self._replay_start(record, None)
                    yield Completed(Completion(raw=record.body))
                    yield Finish()
                    return
                self._retry = True
            if not self._retry:
                return
            # The first attempt gave up before answering: claim the key again (or follow its retry).

    def _replay_start(self, record: idempotency.Record, stream_id: str | None) -> Start:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in record.headers.items()]
        headers += ((REPLAYED, b"true"), (ORIGINAL, record.request_id.encode()))
        return Start(self.call_id, self.req.model, record.headers.get("x-upstream-model", ""),
                     record.headers.get("x-upstream-provider", ""), headers, stream_id, replayed=True,
                     original_call_id=record.request_id)

    async def _follow_stream(self, record: idempotency.Record, deadline: float):
        """The first request's stream from its first event, following it live while it runs."""
        tenant_id, key, stream_id = self.principal.tenant_id, self.idempotency_key, record.request_id
        if record.state == "done" and not await store.exists(tenant_id, stream_id):
            raise GatewayError(409, "The streamed response for this Idempotency-Key has expired "
                                    f"(stream events are kept {settings.GATEWAY['STREAM_TTL_SECONDS']} s); "
                                    "send the request again with a new key.",
                               code="idempotency_stream_expired", param=idempotency.PARAM)
        start: Start | None = self._replay_start(record, stream_id)
        last, finished = 0, False
        while True:
            async for event in store.events(tenant_id, stream_id, last, ATTACH_POLL_S):
                if start is not None:
                    yield start
                    start = None
                yield event
                if event.kind != "delta":
                    return
                last = event.seq
            # Nothing new for a while: is the first request still producing?
            current = await idempotency.peek(tenant_id, key)
            if current is not None and current.request_id == stream_id and not finished:
                if current.state == "done":
                    finished = True  # its end marker must be there now: one more read
                elif last == 0 and time.monotonic() >= deadline:
                    raise idempotency.in_progress()
                continue
            if last == 0:
                if current is not None and current.request_id == stream_id:  # done, but its events are gone
                    raise GatewayError(409, "The streamed response for this Idempotency-Key can no longer be replayed.",
                                       code="idempotency_stream_expired", param=idempotency.PARAM)
                self._retry = True  # it gave up before its first event: take over
                return
            yield Failed(GatewayError(502, "The original request with this Idempotency-Key stopped before finishing; "
                                           "send it again with the same key.", code="idempotency_original_failed"))
            return


def _ended_by_server(token: CancelToken) -> GatewayError:
    """A call the platform ends because this process is shutting down (anything else that
    cancels the call, such as a client that left, propagates)."""
    if token.reason != SHUTDOWN:
        raise asyncio.CancelledError
    asyncio.current_task().uncancel()
    return GatewayError(503, "The server handling this call is restarting; resume the stream from its last event "
                             "id, or send the request again.", type="server_error", code="server_shutdown",
                        headers={"Retry-After": "1"})


async def resume(tenant_id: int, stream_id: str, after: int):
    """A kept stream's events after `after` (Delta..., then Finish or Failed), following live
    ones: what a client that lost its connection missed. 404 for an unknown or expired stream,
    or one of another tenant."""
    if not await store.exists(tenant_id, stream_id):
        raise GatewayError(404, f"No stream '{stream_id}' (unknown, of another tenant, or expired).",
                           code="stream_not_found")
    return _resumed(tenant_id, stream_id, after)


async def _resumed(tenant_id: int, stream_id: str, after: int):
    async for event in store.events(tenant_id, stream_id, after):
        yield event
        if event.kind != "delta":
            return
    yield Failed(GatewayError(504, "The stream's producer stopped sending; it cannot be resumed further.",
                              code="stream_stalled"))
