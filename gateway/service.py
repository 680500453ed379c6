"""The chat service: route, call the provider, settle usage. Every front door calls this.

    async with open_call(principal, req, ctx) as call:
        completion = await call.complete()        # or: async for chunk in call.stream()
        ...render it in the front door's wire format...
    # leaving the block settles: the usage row is recorded, whatever happened (shielded from
    # cancellation, so a client that hangs up never loses its row).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from billing.pricing import cost_usd
from billing.recorder import record
from tenants.principal import Principal

from .api.errors import GatewayError
from .providers.base import get_provider
from .routing import LaneSpec, Route, routes
from .tokens import count_messages, count_text
from .types import ChatRequest, Chunk, Completion, Outcome, Usage

log = logging.getLogger("gateway.calls")
CLIENT_GONE = 499  # nginx's convention for "the client closed the request"
_settling: set[asyncio.Task] = set()


@dataclass(slots=True)
class CallContext:
    request_id: str
    front_door: str = "rest"
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)


async def resolve_route(principal: Principal, req: ChatRequest) -> Route:
    table = await routes.snapshot()
    route = table.get(req.model)
    if route is None:
        raise GatewayError(404, f"The model `{req.model}` does not exist or you do not have access to it.", code="model_not_found", param="model")
    if not principal.may_use(req.model):
        raise GatewayError(403, f"Your API key is not allowed to use the model `{req.model}`.", code="model_not_allowed", param="model")
    cap = principal.max_tokens_cap
    if cap is not None and req.max_tokens is not None and req.max_tokens > cap:
        raise GatewayError(400, f"max_tokens is too large: {req.max_tokens}. Your tier allows at most {cap}.", code="max_tokens_too_large", param="max_tokens")
    return route


class ChatCall:
    def __init__(self, principal: Principal, req: ChatRequest, route: Route, ctx: CallContext) -> None:
        self.principal = principal
        self.req = req
        self.route = route
        self.ctx = ctx
        self.lane: LaneSpec = route.lanes[0]
        self.outcome = Outcome(completion_text_parts=[] if req.stream or principal.store_content else None)
        self.status = 200
        self.error_code = ""
        self.partial = False
        self.retries = 0

    async def complete(self) -> Completion:
        provider = get_provider(self.lane)
        return await provider.complete(self.lane, self.req, self.outcome)

    async def stream(self) -> AsyncIterator[Chunk]:
        """Chunks for the client; the usage-only chunk only when the client asked for it."""
        provider = get_provider(self.lane)
        finished = False
        async for chunk in provider.stream(self.lane, self.req, self.outcome):
            if chunk.usage_only:
                finished = True
                if not self.req.include_usage:
                    continue
            yield chunk
        if not finished and self.outcome.finish_reason is None:
            self.partial = True

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, GatewayError):
            self.status, self.error_code = exc.status, exc.code or exc.type
        elif isinstance(exc, asyncio.CancelledError | ConnectionError):
            self.status, self.error_code = CLIENT_GONE, "client_disconnected"
        else:
            self.status, self.error_code = 500, "internal_error"
        if self.req.stream and self.outcome.first_token_at is not None:
            self.partial = True

    def usage(self) -> Usage:
        """The provider's count; when a call ended before it reported one, count what was sent."""
        if self.outcome.usage is not None:
            return self.outcome.usage
        if self.outcome.first_token_at is None and self.status >= 400 and self.status != CLIENT_GONE:
            return Usage()
        prompt = count_messages(self.req.messages, self.lane.upstream_model, self.req.tools)
        text = "".join(self.outcome.completion_text_parts or ())
        return Usage(prompt_tokens=prompt, completion_tokens=count_text(text, self.lane.upstream_model))

    def row(self) -> dict:
        usage = self.usage()
        lane = self.lane
        now = time.perf_counter()
        first = self.outcome.first_token_at
        store = self.principal.store_content
        return {
            "request_id": self.ctx.request_id,
            "provider_request_id": self.outcome.provider_request_id or "",
            "created_at": self.ctx.started_wall,
            "tenant_id": self.principal.tenant_id,
            "api_key_id": self.principal.key_id,
            "key_prefix": self.principal.key_prefix,
            "provider": lane.provider,
            "model": self.req.model,
            "upstream_model": self.outcome.upstream_model or lane.upstream_model,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "cache_creation_tokens": usage.cache_creation_tokens,
            "cost_usd": str(cost_usd(lane.price_input, lane.price_output, lane.price_cached_input,
                                     usage.prompt_tokens, usage.completion_tokens,
                                     usage.cached_tokens, usage.cache_creation_tokens)),
            "ttft_ms": round((first - self.ctx.started) * 1000, 3) if first else None,
            "latency_ms": round((now - self.ctx.started) * 1000, 3),
            "finish_reason": self.outcome.finish_reason or "",
            "http_status": self.status,
            "error_code": self.error_code or "",
            "stream": self.req.stream,
            "partial": self.partial,
            "retries": self.retries,
            "end_user": self.req.user or "",
            "feature": self.req.feature or "",
            "front_door": self.ctx.front_door,
            "prompt": self.req.messages if store else None,
            "completion": "".join(self.outcome.completion_text_parts or ()) if store else "",
        }

    async def settle(self) -> None:
        row = self.row()
        log.info(
            "chat call",
            extra={k: row[k] for k in ("request_id", "tenant_id", "key_prefix", "model", "provider",
                                        "http_status", "error_code", "latency_ms", "prompt_tokens",
                                        "completion_tokens", "stream", "partial")},
        )
        await record(row)


@asynccontextmanager
async def open_call(principal: Principal, req: ChatRequest, ctx: CallContext):
    route = await resolve_route(principal, req)
    call = ChatCall(principal, req, route, ctx)
    try:
        yield call
    except BaseException as exc:
        call.fail(exc)
        raise
    finally:
        # Settle in its own task: a cancelled request (client gone) cannot interrupt it.
        task = asyncio.ensure_future(call.settle())
        _settling.add(task)
        task.add_done_callback(_settling.discard)
        await asyncio.shield(task)  # if we are cancelled here, the task still finishes


async def drain_settling(wait_seconds: float = 10.0) -> None:
    """Wait for in-flight settlements (graceful shutdown)."""
    if _settling:
        await asyncio.wait(list(_settling), timeout=wait_seconds)
