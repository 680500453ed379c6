"""OpenAI Chat Completions: `POST /v1/chat/completions` (JSON and SSE) and `GET /v1/streams/{id}`.

A translator only: the body becomes a `ChatRequest`, a `ChatSession` runs it, its events become
a `chat.completion` or SSE `chat.completion.chunk` frames. Chunks from a lane that speaks
OpenAI's protocol go out as the provider's own bytes. Plain async ASGI, no Django request
objects or thread hops (../shared/DEPENDENCIES.md: Django's handler spends ~30% of a request
in thread machinery).
"""

from __future__ import annotations

import contextlib
from urllib.parse import parse_qs

from django.conf import settings

from .. import idempotency
from ..api.http import Request, header_list, send_json
from ..api.validation import parse_json, validate_chat
from ..chat import CancelToken, ChatSession, resume
from ..errors import GatewayError, method_not_allowed
from .common import ClientSink, principal_of, truthy, until_disconnect

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE = b"text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"
FRONT_DOOR = "openai"


async def chat_completions(request: Request, receive, send) -> None:
    if request.method != "POST":
        raise method_not_allowed(request.method, request.path)
    body = await request.read_body(receive, settings.GATEWAY["MAX_BODY_BYTES"])
    principal = await principal_of(request)
    data = parse_json(body)
    headers = request.headers
    req = validate_chat(data, headers.get("x-feature"), headers.get("x-context-overflow"))
    key = headers.get(idempotency.HEADER)
    # A client that asks for a resumable stream may drop and come back: the call goes on.
    resumable = req.stream and truthy(headers.get("x-stream-resumable"))
    session = ChatSession(principal, req, call_id=request.call_id, front_door=FRONT_DOOR,
                          cancel=CancelToken(), keep_events=resumable,
                          idempotency_key=idempotency.check_key(key) if key is not None else None,
                          fingerprint=idempotency.fingerprint(data) if key is not None else None)
    if req.stream:
        sink = ClientSink(send)
        await until_disconnect(_stream(request, sink, session), receive, session.cancel, sink if resumable else None)
    else:
        await until_disconnect(_json(request, send, session), receive, session.cancel)


def _replay_headers(start) -> dict:
    return SSE_HEADERS if start.stream_id is None else {**SSE_HEADERS, "x-stream-id": start.stream_id}


async def _json(request: Request, send, session: ChatSession) -> None:
    async def deliver(start, completion) -> None:
        await send_json(send, 200, completion.data, request.request_id, pairs=start.headers)

    await session.complete(deliver)


async def _stream(request: Request, send, session: ChatSession) -> None:
    frames: list[bytes] = []
    events = session.events()
    try:
        async for event in events:
            if event.kind == "delta":
                frames.append(b"id: %d\ndata: %s\n\n" % (event.seq, event.data))
                if not event.batched:  # one write per provider read, not one per chunk
                    await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
                    frames.clear()
            elif event.kind == "start":
                await send({"type": "http.response.start", "status": 200,
                            "headers": header_list(request.request_id, SSE, _replay_headers(event), event.headers)})
            else:
                frames.append(_end(event))
                await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})
    finally:
        await events.aclose()  # a door that stops early closes the call now (its client is gone)


def _end(event) -> bytes:
    """The last frame: `[DONE]`, or (after the first byte the status is sent) an error event."""
    if event.kind == "finish":
        return b"id: %d\n" % event.seq + DONE
    if event.seq:
        return b"id: %d\ndata: %s\n\n" % (event.seq, event.error.body())
    return b"data: " + event.error.body() + b"\n\n"


async def resume_stream(request: Request, receive, send) -> None:
    """GET /v1/streams/{id} with `Last-Event-ID: N`: the events after N, then the live rest."""
    if request.method != "GET":
        raise method_not_allowed(request.method, request.path)
    principal = await principal_of(request)
    stream_id = request.path[len("/v1/streams/"):].strip("/")
    last = request.headers.get("last-event-id") or _query(request, "last_event_id") or "0"
    if not last.isdigit():
        raise GatewayError(400, "Last-Event-ID must be the number of the last event received.", param="Last-Event-ID")
    events = await resume(principal.tenant_id, stream_id, int(last))
    await send({"type": "http.response.start", "status": 200,
                "headers": header_list(request.request_id, SSE, {**SSE_HEADERS, "x-stream-id": stream_id})})
    async with contextlib.aclosing(events):
        async for event in events:
            if event.kind == "delta":
                body, more = b"id: %d\ndata: %s\n\n" % (event.seq, event.data), True
            else:
                body, more = _end(event), False
            await send({"type": "http.response.body", "body": body, "more_body": more})


def _query(request: Request, name: str) -> str | None:
    values = parse_qs(request.scope.get("query_string", b"").decode()).get(name)
    return values[-1] if values else None
