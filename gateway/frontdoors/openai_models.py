"""OpenAI Models: `GET /v1/models` and `GET /v1/models/{id}`, the models a key may use."""

from __future__ import annotations

import orjson

from ..api.http import Request, send_json
from ..chat import resolve_route
from ..errors import method_not_allowed
from ..routing import routes
from ..types import ChatRequest
from .common import principal_of


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
    route = await resolve_route(principal, ChatRequest(model=name, messages=[]))
    await send_json(send, 200, orjson.dumps(_model_entry(route)), request.request_id)
