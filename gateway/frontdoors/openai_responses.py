"""OpenAI Responses: `POST /v1/responses` (JSON and typed SSE events), `GET`/`DELETE
/v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

A translator: the body (and the stored conversation `previous_response_id` names) becomes a
chat request for the session; its events become a Response object or typed events. Stored
responses are written before the answer's last byte, so a follow-up sent the moment the first
answer is done finds it, on any lane. Another tenant's response id is a 404, for retrieval and
for `previous_response_id` alike.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, timedelta

import orjson
from django.conf import settings

from llm_platform.db import orm

from .. import idempotency
from ..api.http import Request, header_list, send_json
from ..api.nesting import nests_too_deep, too_deep_error
from ..api.validation import parse_json, validate_chat
from ..chat import CancelToken, ChatSession
from ..errors import GatewayError, invalid, method_not_allowed
from ..models import StoredResponse
from . import responses_wire as wire
from .common import ClientSink, principal_of, until_disconnect

FRONT_DOOR = "responses"
SSE = b"text/event-stream; charset=utf-8"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
PREFIX = "/v1/responses"


def _not_found(response_id: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, f"Response with id '{response_id}' not found.", code="response_not_found" if param is None
                        else "previous_response_not_found", param=param)


def _load(tenant_id: int, response_id: str) -> StoredResponse | None:
    return StoredResponse.objects.filter(pk=response_id, tenant_id=tenant_id,
                                         expires_at__gt=datetime.now(UTC)).first()


def _storable(value):
    """PostgreSQL's jsonb refuses NUL characters (JSON allows them): stored as U+FFFD instead."""
    raw = orjson.dumps(value)
    return orjson.loads(raw.replace(b"\\u0000", b"\\ufffd")) if b"\\u0000" in raw else value


def purge_expired(batch: int = 1000) -> int:
    """Delete stored responses past their retention, in batches (no long lock); how many."""
    deleted = 0
    while True:
        ids = list(StoredResponse.objects.filter(expires_at__lte=datetime.now(UTC)).values_list("pk", flat=True)[:batch])
        if not ids:
            return deleted
        deleted += StoredResponse.objects.filter(pk__in=ids).delete()[0]


def _save(tenant_id: int, body: dict, data: dict, items: list, conversation: list) -> None:
    now = datetime.now(UTC)
    StoredResponse.objects.create(
        id=body["id"], tenant_id=tenant_id, created_at=now, model=str(data.get("model")).replace("\x00", "\ufffd"),
        expires_at=now + timedelta(days=settings.GATEWAY["RESPONSES_TTL_DAYS"]),
        previous_response_id=data.get("previous_response_id") or "", body=_storable(body),
        input_items=_storable(items), conversation=_storable(conversation))


async def responses(request: Request, receive, send) -> None:
    rest = request.path[len(PREFIX):].strip("/")
    if rest:
        return await _stored(request, rest)(request, send)
    if request.method != "POST":
        raise method_not_allowed(request.method, request.path)
    body = await request.read_body(receive, settings.GATEWAY["MAX_BODY_BYTES"])
    principal = await principal_of(request)
    data = parse_json(body)
    if nests_too_deep(data, []):  # before anything echoes or stores a part of it
        raise too_deep_error(data)
    if not isinstance(data.get("store", True), bool):
        raise invalid("Invalid 'store': expected a boolean.", "store")
    history: list[dict] = []
    previous = data.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise invalid("Invalid 'previous_response_id': expected a string.", "previous_response_id")
        stored = await orm(_load, principal.tenant_id, previous)
        if stored is None:
            raise _not_found(previous, "previous_response_id")
        history = stored.conversation
    chat, turn, items = wire.to_chat_body(data, history)
    req = validate_chat(chat, request.headers.get("x-feature"))
    key = request.headers.get(idempotency.HEADER)
    session = ChatSession(principal, req, call_id=request.call_id, front_door=FRONT_DOOR, cancel=CancelToken(),
                          idempotency_key=idempotency.check_key(key) if key is not None else None,
                          fingerprint=idempotency.fingerprint(data) if key is not None else None)
    turn_state = _Turn(principal.tenant_id, data, items, history + turn)
    if req.stream:
        sink = ClientSink(send)
        await until_disconnect(_stream(request, sink, session, turn_state), receive, session.cancel)
    else:
        await until_disconnect(_json(request, send, session, turn_state), receive, session.cancel)


class _Turn:
    """What storing this turn needs besides its output."""

    __slots__ = ("tenant_id", "data", "items", "conversation")

    def __init__(self, tenant_id: int, data: dict, items: list, conversation: list) -> None:
        self.tenant_id, self.data, self.items, self.conversation = tenant_id, data, items, conversation

    async def store(self, body: dict) -> None:
        if self.data.get("store", True) is not False:
            conversation = self.conversation + wire.assistant_messages(body["output"])
            await orm(_save, self.tenant_id, body, self.data, self.items, conversation)


async def _json(request: Request, send, session: ChatSession, turn: _Turn) -> None:
    async def deliver(start, completion) -> None:
        choices = completion.choices()
        choice = choices[0] if choices else None
        output = wire.output_items(choice.text if choice else None, choice.tool_calls if choice else None)
        body = wire.response_object(wire.new_id("resp"), time.time(), turn.data, output, completion.usage,
                                    "completed", choice.finish_reason if choice else None)
        await turn.store(body)
        await send_json(send, 200, orjson.dumps(body), request.request_id, pairs=start.headers)

    await session.complete(deliver)


def _sse(events: list) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(payload)) for kind, payload in events)


async def _stream(request: Request, send, session: ChatSession, turn: _Turn) -> None:
    renderer = wire.StreamRenderer(wire.new_id("resp"), turn.data)
    async with contextlib.aclosing(session.events()) as events:
        async for event in events:
            if event.kind == "delta":
                frames = renderer.delta(event)
                if frames:
                    await send({"type": "http.response.body", "body": _sse(frames), "more_body": True})
            elif event.kind == "start":
                await send({"type": "http.response.start", "status": 200,
                            "headers": header_list(request.request_id, SSE, SSE_HEADERS, event.headers)})
                await send({"type": "http.response.body", "body": _sse(renderer.started()), "more_body": True})
            elif event.kind == "finish":
                frames = renderer.finished(event.usage)
                await turn.store(frames[-1][1]["response"])  # stored before the last byte
                await send({"type": "http.response.body", "body": _sse(frames), "more_body": False})
            else:
                await send({"type": "http.response.body", "body": _sse(renderer.failed(event.error)), "more_body": False})


def _stored(request: Request, rest: str):
    """GET/DELETE /v1/responses/{id} and GET /v1/responses/{id}/input_items."""
    response_id, _, tail = rest.partition("/")
    if tail not in ("", "input_items") or (tail and request.method != "GET") or request.method not in ("GET", "DELETE"):
        raise method_not_allowed(request.method, request.path)

    async def handle(request: Request, send) -> None:
        principal = await principal_of(request)
        stored = await orm(_load, principal.tenant_id, response_id)
        if stored is None:
            raise _not_found(response_id)
        if request.method == "DELETE":
            await orm(stored.delete)
            body = {"id": response_id, "object": "response", "deleted": True}
        elif tail:
            items = [{"id": item.get("id") or f"msg_{response_id[5:]}_{i}", **item}
                     for i, item in enumerate(stored.input_items)]
            body = {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                    "last_id": items[-1]["id"] if items else None, "has_more": False}
        else:
            body = stored.body
        await send_json(send, 200, orjson.dumps(body), request.request_id)

    return handle
