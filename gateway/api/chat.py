"""The hot path's handlers: /v1/chat/completions (JSON and SSE) and /v1/models.

Plain async ASGI handlers, no Django request/response objects, no middleware, no thread hops
(../shared/DEPENDENCIES.md: Django's handler spends ~30% of a request in thread machinery).
"""

from __future__ import annotations

import asyncio
import time

import orjson
import redis.exceptions
from asgiref.sync import sync_to_async
from django.conf import settings

from tenants.auth import AuthenticationFailed, authenticate, extract_key
from tenants.principal import Principal

from .. import idempotency
from ..routing import routes
from ..service import CallContext, open_call, resolve_route
from ..stream_store import StreamWriter, replay
from ..stream_store import exists as stream_exists
from ..structured import StreamChecker
from .errors import GatewayError, method_not_allowed
from .http import JSON, Request, header_list, send_json
from .validation import parse_json, validate_chat

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE = b"text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"
ATTACH_POLL_S = 1.0  # a duplicate attached to a running stream checks on its producer this often


async def principal_of(request: Request) -> Principal:
    try:
        key = extract_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        return await authenticate(key)
    except AuthenticationFailed as exc:
        await _count_bad_key(request.client_ip)
        raise GatewayError(401, exc.reason, code=exc.code) from None
    except (redis.exceptions.RedisError, OSError):
        raise GatewayError(503, "The platform's key store is unreachable; retry shortly.", type="server_error",
                           code="auth_unavailable", headers={"Retry-After": "2"}) from None


def _bad_key_usage(ip: str) -> dict | None:
    from django_ratelimit.core import get_usage

    return get_usage(_AddressOnly, group="gw.bad-keys", key=lambda group, request: ip,
                     rate=settings.GATEWAY["BAD_KEY_RATE"], increment=True)


class _AddressOnly:
    """django-ratelimit only needs a method here: the key is the caller's address."""

    method = "POST"


async def _count_bad_key(ip: str) -> None:
    """Failed authentications per address, counted by django-ratelimit; too many get 429."""
    try:
        usage = await sync_to_async(_bad_key_usage, thread_sensitive=False)(ip)
    except Exception:  # the counter store is down: answer the 401 anyway
        return
    if usage and usage["should_limit"]:
        raise GatewayError(429, "Too many requests with invalid API keys from your address; slow down.",
                           type="rate_limit_error", code="too_many_invalid_keys",
                           headers={"Retry-After": str(max(1, usage["time_left"]))})


async def chat_completions(request: Request, receive, send) -> None:
    if request.method != "POST":
        raise method_not_allowed(request.method, request.path)
    body = await request.read_body(receive, settings.GATEWAY["MAX_BODY_BYTES"])
    principal = await principal_of(request)
    data = parse_json(body)
    req = validate_chat(data, request.headers.get("x-feature"), request.headers.get("x-context-overflow"))
    ctx = CallContext(request.call_id)
    key = request.headers.get(idempotency.HEADER)
    if key is not None:
        await _idempotent(request, receive, send, principal, req, ctx, idempotency.check_key(key), data)
    else:
        await _serve(request, receive, send, principal, req, ctx)


async def _serve(request: Request, receive, send, principal, req, ctx: CallContext) -> None:
    if req.stream:
        # A client that asks for a resumable stream may drop and come back: the call goes on.
        resumable = request.headers.get("x-stream-resumable", "").lower() in ("1", "true", "yes")
        sink = send if isinstance(send, ClientSink) else ClientSink(send)
        await until_disconnect(_stream(request, sink, principal, req, ctx), receive,
                               on_disconnect=None if not resumable else sink)
    else:
        await until_disconnect(_complete(request, send, principal, req, ctx), receive)


async def _complete(request: Request, send, principal, req, ctx: CallContext) -> None:
    async with open_call(principal, req, ctx) as call:
        completion = await call.complete()
        await send_json(send, 200, completion.data, request.request_id, pairs=call.response_headers())


class ClientSink:
    """`send` that remembers a client who left; a resumable stream keeps producing after that."""

    def __init__(self, send) -> None:
        self._send = send
        self.gone = False

    async def __call__(self, message) -> None:
        if self.gone:
            return
        try:
            await self._send(message)
        except OSError:
            self.gone = True


def _frame(seq: int, data: bytes) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (seq, data)


def _keep_events(request: Request) -> bool:
    """Events are kept for streams that can be resumed or replayed: those that asked to be
    resumable and those with an Idempotency-Key. Others pay nothing for it."""
    if not settings.GATEWAY["STREAM_RESUME_ENABLED"]:
        return False
    headers = request.headers
    return "idempotency-key" in headers or headers.get("x-stream-resumable", "").lower() in ("1", "true", "yes")


async def _stream(request: Request, send, principal, req, ctx: CallContext) -> None:
    sink = send if isinstance(send, ClientSink) else ClientSink(send)
    async with open_call(principal, req, ctx) as call:
        chunks = call.stream()
        # The first chunk decides the status: a provider refusal before it is a plain JSON error.
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        store = StreamWriter(principal.tenant_id, request.call_id) if _keep_events(request) else None
        checker = StreamChecker(call.schema) if call.schema is not None else None
        extra = {**SSE_HEADERS, "x-stream-id": request.call_id} if store is not None else SSE_HEADERS
        await sink({"type": "http.response.start", "status": 200,
                    "headers": header_list(request.request_id, SSE, extra, call.response_headers())})
        seq = 0
        frames: list[bytes] = []
        try:
            pending = [first] if first is not None else []
            async for chunk in _chain(pending, chunks):
                data = chunk.data
                seq = store.add(data) if store is not None else seq + 1
                if checker is not None:
                    checker.feed(chunk.as_dict)
                frames.append(_frame(seq, data))
                if not chunk.batched:
                    await sink({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
                    frames.clear()
            problem = checker.problem() if checker is not None else None
            if problem is not None:
                raise GatewayError(502, f"The model's output did not match the requested JSON schema: {problem}",
                                   type="server_error", code="structured_output_invalid")
        except GatewayError as exc:
            # After the first byte the status is sent: end with an error event, never silently.
            call.fail(exc)
            call.partial = True
            if store is not None:
                await store.finish("error", exc.body())
            frames.append(_frame(seq + 1, exc.body()))
            await sink({"type": "http.response.body", "body": b"".join(frames), "more_body": False})
            return
        if store is not None:
            await store.finish("done")
        frames.append(b"id: %d\n" % (seq + 1) + DONE)
        await sink({"type": "http.response.body", "body": b"".join(frames), "more_body": False})


async def _chain(first: list, rest):
    for item in first:
        yield item
    async for item in rest:
        yield item


async def resume_stream(request: Request, receive, send) -> None:
    """GET /v1/streams/{id} with `Last-Event-ID: N`: the events after N, then the live rest."""
    if request.method != "GET":
        raise method_not_allowed(request.method, request.path)
    principal = await principal_of(request)
    stream_id = request.path[len("/v1/streams/"):].strip("/")
    last = request.headers.get("last-event-id") or _query(request, "last_event_id") or "0"
    if not last.isdigit():
        raise GatewayError(400, "Last-Event-ID must be the number of the last event received.", param="Last-Event-ID")
    if not await stream_exists(principal.tenant_id, stream_id):
        raise GatewayError(404, f"No stream '{stream_id}' (unknown, of another tenant, or expired).", code="stream_not_found")
    await send({"type": "http.response.start", "status": 200,
                "headers": header_list(request.request_id, SSE, {**SSE_HEADERS, "x-stream-id": stream_id})})
    _, ended = await _send_kept(send, principal.tenant_id, stream_id, int(last))
    if not ended:
        error = GatewayError(504, "The stream's producer stopped sending; it cannot be resumed further.", code="stream_stalled")
        await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n", "more_body": False})


async def _send_kept(send, tenant_id: int, stream_id: str, after: int, wait_s: float = 30.0,
                     start: dict | None = None) -> tuple[int, bool]:
    """Send a stream's kept events after `after` as SSE frames, following live ones, preceded by
    `start` (the response start) if given and anything comes. (last id sent, whether it ended)."""
    async for seq, kind, data in replay(tenant_id, stream_id, after, wait_s):
        if start is not None:
            await send(start)
            start = None
        if kind == "event":
            body, more = _frame(seq, data), True
        elif kind == "done":
            body, more = b"id: %d\n" % seq + DONE, False
        else:
            body, more = _frame(seq, data), False
        await send({"type": "http.response.body", "body": body, "more_body": more})
        after = seq
        if not more:
            return after, True
    return after, False


# --- Idempotency-Key (gateway/idempotency.py keeps the records) ---------------------------------

class _Recorder(ClientSink):
    """The sink of a call that holds an idempotency claim: notes what was sent, even to a client
    who left (a resumable stream goes on): the status, the headers, and the JSON body or whether
    the stream ended with [DONE]."""

    def __init__(self, send, keep_body: bool) -> None:
        super().__init__(send)
        self.status = 0
        self.headers: list = []
        self.parts: list[bytes] | None = [] if keep_body else None
        self.ended = False
        self.done = False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], message["headers"]
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if self.parts is not None:
                self.parts.append(body)
            if not message.get("more_body", False):
                self.ended = True
                self.done = body.endswith(DONE)
        await super().__call__(message)

    def succeeded(self) -> bool:
        return self.status == 200 and self.ended and (self.parts is not None or self.done)


async def _idempotent(request: Request, receive, send, principal, req, ctx: CallContext, key: str, data: dict) -> None:
    """One provider call per key: run it if we claim the key, else wait for / attach to / replay it."""
    fp = idempotency.fingerprint(data)
    tenant_id = principal.tenant_id
    deadline = time.monotonic() + idempotency.wait_limit_s()
    while True:
        claim, record = await idempotency.claim(tenant_id, key, fp, request.call_id, req.stream)
        if claim is not None:
            await _run_claimed(request, receive, send, principal, req, ctx, claim)
            return
        if record.stream and not settings.GATEWAY["STREAM_RESUME_ENABLED"]:
            raise GatewayError(409, "A streamed request with this Idempotency-Key exists, but stream events are not "
                                    "kept on this platform (GW_STREAM_RESUME_ENABLED is off), so it cannot be replayed.",
                               code="idempotency_stream_unavailable", param=idempotency.PARAM)
        follow = _follow_stream if record.stream else _follow_json
        retry: list[bool] = []
        await until_disconnect(follow(request, send, tenant_id, key, fp, record, deadline, retry), receive)
        if not retry:
            return
        # The first attempt gave up before sending anything: claim the key again (or follow its retry).


async def _run_claimed(request: Request, receive, send, principal, req, ctx: CallContext, claim) -> None:
    recorder = _Recorder(send, keep_body=not req.stream)
    claim.keep_alive()
    try:
        await _serve(request, receive, recorder, principal, req, ctx)
    finally:
        success = recorder.succeeded()
        await claim.finish(success, recorder.headers, b"".join(recorder.parts or ()) if success else b"")


def _replayed(record) -> dict[str, str]:
    return {"x-idempotent-replayed": "true", "x-original-request-id": record.request_id}


async def _follow_json(request: Request, send, tenant_id: int, key: str, fp: str, record, deadline: float,
                       retry: list) -> None:
    """Answer with the first request's stored JSON response, once it has one."""
    if record.state != "done":
        record = await idempotency.wait_done(tenant_id, key, fp, deadline)
        if record is None:
            retry.append(True)
            return
    await send_json(send, 200, record.body, request.request_id, {**record.headers, **_replayed(record)})


async def _follow_stream(request: Request, send, tenant_id: int, key: str, fp: str, record, deadline: float,
                         retry: list) -> None:
    """Replay the first request's stream from its first event, following it live while it runs."""
    stream_id = record.request_id
    if record.state == "done" and not await stream_exists(tenant_id, stream_id):
        raise GatewayError(409, "The streamed response for this Idempotency-Key has expired "
                                f"(stream events are kept {settings.GATEWAY['STREAM_TTL_SECONDS']} s); "
                                "send the request again with a new key.",
                           code="idempotency_stream_expired", param=idempotency.PARAM)
    start = {"type": "http.response.start", "status": 200,
             "headers": header_list(request.request_id, SSE, {**SSE_HEADERS, **record.headers, "x-stream-id": stream_id,
                                                               **_replayed(record)})}
    last, finished = 0, False
    while True:
        last, ended = await _send_kept(send, tenant_id, stream_id, last, ATTACH_POLL_S, start if last == 0 else None)
        if ended:
            return
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
            retry.append(True)  # it gave up before its first event: take over
            return
        error = GatewayError(502, "The original request with this Idempotency-Key stopped before finishing; "
                                  "send it again with the same key.", code="idempotency_original_failed")
        await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n", "more_body": False})
        return


def _query(request: Request, name: str) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(request.scope.get("query_string", b"").decode()).get(name)
    return values[-1] if values else None


def _model_entry(route) -> dict:
    return {"id": route.model, "object": "model", "created": route.created, "owned_by": route.owned_by}


async def list_models(request: Request, receive, send) -> None:
    if request.method != "GET":
        raise method_not_allowed(request.method, request.path)
    principal = await principal_of(request)
    table = await routes.snapshot()
    data = [_model_entry(r) for name, r in sorted(table.items()) if principal.may_use(name)]
    await send_json(send, 200, orjson.dumps({"object": "list", "data": data}), request.request_id)


async def retrieve_model(request: Request, receive, send) -> None:
    if request.method != "GET":
        raise method_not_allowed(request.method, request.path)
    principal = await principal_of(request)
    name = request.path[len("/v1/models/"):]
    from ..types import ChatRequest

    route = await resolve_route(principal, ChatRequest(model=name, messages=[]))
    await send_json(send, 200, orjson.dumps(_model_entry(route)), request.request_id)


async def health(request: Request, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": header_list(request.request_id, JSON)})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


async def until_disconnect(work, receive, on_disconnect: ClientSink | None = None) -> None:
    """Run the handler; if the client hangs up first, cancel it (and so the upstream call).

    With `on_disconnect` (a resumable stream) the handler keeps running and only stops sending.
    The handler runs in this task; one watcher task waits for the disconnect.
    """
    me = asyncio.current_task()
    left = False

    async def watch() -> None:
        nonlocal left
        while (await receive())["type"] != "http.disconnect":
            pass
        if on_disconnect is not None:
            on_disconnect.gone = True
            return
        left = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not left:
            raise
        me.uncancel()  # our own cancellation: the client left, nothing more to send
    finally:
        watcher.cancel()
        if left and me.cancelling():
            me.uncancel()
