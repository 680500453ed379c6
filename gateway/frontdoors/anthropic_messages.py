"""Anthropic Messages: `POST /v1/messages` (JSON and SSE) and `POST /v1/messages/count_tokens`.

A translator only, so that the official `anthropic` SDK works with `base_url` at the platform:
the body becomes a `ChatRequest` (anthropic_wire.py), a `ChatSession` runs it on any lane, and
its events become an Anthropic `Message` or Anthropic's event stream (anthropic_render.py).
Every error this door answers, whatever raised it, is in Anthropic's shape.
"""

from __future__ import annotations

import contextlib
import logging

import orjson
from django.conf import settings

from .. import idempotency
from ..api.http import Request, header_list, send_json
from ..api.validation import parse_json
from ..chat import CancelToken, ChatSession
from ..chat.call import resolve_route
from ..errors import GatewayError, method_not_allowed
from ..tokens import count_messages
from . import anthropic_render as render
from . import anthropic_wire as wire
from .common import principal_of, until_disconnect

FRONT_DOOR = "anthropic"
SSE = b"text/event-stream; charset=utf-8"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
log = logging.getLogger("gateway.http")


def anthropic_errors(handler):
    """Have the ASGI entry answer this door's failures before the first byte in Anthropic's
    error shape (its default is OpenAI's): the entry's one error path, this door's renderer."""
    handler.send_error = send_error
    return handler


async def send_error(send, exc: GatewayError, request_id: str) -> None:
    status, _ = render.error_status(exc)
    await send_json(send, status, render.error_body(exc, request_id), request_id,
                    {**exc.headers, "request-id": request_id})


def _parse(request: Request, body: bytes, need_max_tokens: bool = True):
    data = parse_json(body)
    return data, wire.parse_request(data, request.headers.get("x-feature"), need_max_tokens=need_max_tokens)


@anthropic_errors
async def create_message(request: Request, receive, send) -> None:
    if request.method != "POST":
        raise method_not_allowed(request.method, request.path)
    body = await request.read_body(receive, settings.GATEWAY["MAX_BODY_BYTES"])
    principal = await principal_of(request)
    data, req = _parse(request, body)
    key = request.headers.get(idempotency.HEADER)
    session = ChatSession(principal, req, call_id=request.call_id, front_door=FRONT_DOOR, cancel=CancelToken(),
                          idempotency_key=idempotency.check_key(key) if key is not None else None,
                          fingerprint=idempotency.fingerprint(data) if key is not None else None)
    work = _stream(request, send, session) if req.stream else _json(request, send, session)
    await until_disconnect(work, receive, session.cancel)


def _message_id(start) -> str:
    return render.message_id(start.original_call_id or start.call_id)


async def _json(request: Request, send, session: ChatSession) -> None:
    async with contextlib.aclosing(session.events()) as events:
        async for event in events:
            if event.kind == "start":
                start = event
            elif event.kind == "completed":
                completion = event.completion
            elif event.kind == "finish":  # its usage has the cache counts the completion's lacks
                model = completion.as_dict.get("model") or start.upstream_model or start.model
                message = render.to_message(completion, _message_id(start), model, event.usage or completion.usage)
                await send_json(send, 200, orjson.dumps(message), request.request_id,
                                {"request-id": request.request_id}, pairs=start.headers)


async def _stream(request: Request, send, session: ChatSession) -> None:
    frames: list[bytes] = []
    renderer = render.StreamRenderer("", "")  # replaced at Start, which always comes first
    async with contextlib.aclosing(session.events()) as events:
        async for event in events:
            if event.kind == "delta":
                frames.append(renderer.feed(event))
                if not event.batched:  # one write per provider read, not one per chunk
                    body = b"".join(frames)
                    frames.clear()
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
            elif event.kind == "start":
                await send({"type": "http.response.start", "status": 200,
                            "headers": header_list(request.request_id, SSE,
                                                   {**SSE_HEADERS, "request-id": request.request_id}, event.headers)})
                renderer = render.StreamRenderer(_message_id(event), event.upstream_model or event.model,
                                                 event.prompt_tokens)
                frames.append(renderer.start())
            else:
                end = renderer.finish(event.usage) if event.kind == "finish" else renderer.fail(event.error, request.request_id)
                frames.append(end)
                await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})


@anthropic_errors
async def count_tokens(request: Request, receive, send) -> None:
    """The platform's own count for the model's first lane (what admission reserves)."""
    if request.method != "POST":
        raise method_not_allowed(request.method, request.path)
    body = await request.read_body(receive, settings.GATEWAY["MAX_BODY_BYTES"])
    principal = await principal_of(request)
    _, req = _parse(request, body, need_max_tokens=False)
    lane = (await resolve_route(principal, req)).lanes[0]
    tokens = count_messages(req.messages, lane.upstream_model, req.tools)
    await send_json(send, 200, orjson.dumps({"input_tokens": tokens}), request.request_id,
                    {"request-id": request.request_id})
