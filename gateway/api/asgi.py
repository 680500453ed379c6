"""The HTTP entry point: the gateway's hot paths here, everything else to Django."""

from __future__ import annotations

import logging

from ..errors import GatewayError
from ..frontdoors.anthropic_messages import count_tokens, create_message
from ..frontdoors.openai_chat import chat_completions, resume_stream
from ..frontdoors.openai_models import list_models, retrieve_model
from ..frontdoors.openai_responses import responses
from .http import JSON, Request, header_list, send_error

log = logging.getLogger("gateway.http")

async def health(request: Request, receive, send) -> None:
    """The process is alive (touches nothing)."""
    await send({"type": "http.response.start", "status": 200, "headers": header_list(request.request_id, JSON)})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


HOT_ROUTES = {
    "/v1/chat/completions": chat_completions,
    "/v1/messages": create_message,
    "/v1/messages/count_tokens": count_tokens,
    "/v1/models": list_models,
    "/v1/responses": responses,
    "/health": health,
}
PREFIX_ROUTES = (("/v1/models/", retrieve_model), ("/v1/streams/", resume_stream), ("/v1/responses/", responses))


class GatewayHTTP:
    """An ASGI app: our async handlers for the hot paths, Django for admin, DRF and the rest."""

    def __init__(self, django_app) -> None:
        self.django_app = django_app

    def _handler(self, path: str):
        handler = HOT_ROUTES.get(path) or HOT_ROUTES.get(path.rstrip("/"))
        if handler is None:
            for prefix, candidate in PREFIX_ROUTES:
                if path.startswith(prefix) and len(path) > len(prefix):
                    return candidate
        return handler

    async def __call__(self, scope, receive, send) -> None:
        handler = self._handler(scope["path"])
        if handler is None:
            return await self.django_app(scope, receive, send)
        request = Request(scope)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        # A front door may render errors in its own protocol's shape (`renders_errors`).
        render = getattr(handler, "send_error", send_error)
        try:
            await handler(request, receive, tracking_send)
        except GatewayError as exc:
            if not started:
                await render(send, exc, request.request_id)
        except ConnectionError:
            return  # the client left before we answered
        except Exception:
            log.exception("unhandled error", extra={"request_id": request.request_id, "path": request.path})
            if not started:
                await render(send, GatewayError(500, "The platform hit an internal error; it has been logged.",
                                                code="internal_error"), request.request_id)
