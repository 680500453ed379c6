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
from decimal import Decimal

from django.conf import settings

from billing.pricing import cost_usd
from billing.recorder import record
from tenants.principal import Principal

from . import limits
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
        self.prompt_tokens = 0
        self.reserve_tokens = 0
        self.trimmed = 0
        self.admission: limits.Admission | None = None

    def preflight(self) -> None:
        """Count the prompt, check the context window (trimming if asked), size the reservation."""
        req, lane = self.req, self.lane
        self.prompt_tokens = count_messages(req.messages, lane.upstream_model, req.tools)
        wanted = req.max_tokens or 1
        while self.prompt_tokens + wanted > lane.context_window:
            if not req.trim_oldest or not self._drop_oldest_turn():
                raise GatewayError(
                    400,
                    f"This model's maximum context length is {lane.context_window} tokens. However, you "
                    f"requested {self.prompt_tokens + wanted} tokens ({self.prompt_tokens} in the messages, "
                    f"{wanted} in the completion). Please reduce the length of the messages or completion, "
                    "or send context_overflow='trim_oldest'.",
                    code="context_length_exceeded", param="messages")
            self.prompt_tokens = count_messages(req.messages, lane.upstream_model, req.tools)
        room = lane.context_window - self.prompt_tokens
        self.reserve_tokens = req.max_tokens or min(room, settings.GATEWAY["DEFAULT_RESERVE_TOKENS"])

    def _drop_oldest_turn(self) -> bool:
        """Drop the oldest non-system message (and tool results orphaned by it); keep the last."""
        messages = self.req.messages
        first = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), None)
        if first is None or first >= len(messages) - 1:
            return False
        del messages[first]
        self.trimmed += 1
        while first < len(messages) - 1 and messages[first].get("role") == "tool":
            del messages[first]
            self.trimmed += 1
        if not any(m.get("role") == "user" for m in messages):
            return False
        return True

    async def admit(self) -> None:
        if not settings.GATEWAY["LIMITS_ENABLED"]:
            return
        estimate = limits.estimate_nano(self.lane, self.prompt_tokens, self.reserve_tokens)
        self.admission = await limits.admit(self.principal, self.ctx.request_id,
                                            self.prompt_tokens + self.reserve_tokens, estimate)

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.admission.headers) if self.admission else {}
        headers["x-upstream-model"] = self.outcome.upstream_model or self.lane.upstream_model
        if self.trimmed:
            headers["x-context-trimmed-messages"] = str(self.trimmed)
        return headers

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
        prompt = self.prompt_tokens or count_messages(self.req.messages, self.lane.upstream_model, self.req.tools)
        text = "".join(self.outcome.completion_text_parts or ())
        return Usage(prompt_tokens=prompt, completion_tokens=count_text(text, self.lane.upstream_model))

    def row(self, usage: Usage, cost: Decimal) -> dict:
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
            "cost_usd": str(cost),
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
        usage = self.usage()
        lane = self.lane
        cost = cost_usd(lane.price_input, lane.price_output, lane.price_cached_input, usage.prompt_tokens,
                        usage.completion_tokens, usage.cached_tokens, usage.cache_creation_tokens)
        row = self.row(usage, cost)
        log.info(
            "chat call",
            extra={k: row[k] for k in ("request_id", "tenant_id", "key_prefix", "model", "provider",
                                        "http_status", "error_code", "latency_ms", "prompt_tokens",
                                        "completion_tokens", "stream", "partial")},
        )
        if self.admission is not None:
            try:
                await limits.settle(self.admission, usage.total_tokens, cost, row)
                return
            except Exception:  # Redis away: keep the row (slots expire, refunds are lost)
                log.warning("settlement failed; usage row kept for later", extra={"request_id": row["request_id"]})
        await record(row)


@asynccontextmanager
async def open_call(principal: Principal, req: ChatRequest, ctx: CallContext):
    route = await resolve_route(principal, req)
    call = ChatCall(principal, req, route, ctx)
    call.preflight()
    await call.admit()  # a refusal here raises before anything is charged or recorded
    heartbeat = _keep_slots(call.admission)
    try:
        yield call
    except BaseException as exc:
        call.fail(exc)
        raise
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        # Settle in its own task: a cancelled request (client gone) cannot interrupt it.
        task = asyncio.ensure_future(call.settle())
        _settling.add(task)
        task.add_done_callback(_settling.discard)
        await asyncio.shield(task)  # if we are cancelled here, the task still finishes


def _keep_slots(admission: limits.Admission | None) -> asyncio.Task | None:
    if admission is None or not admission.slots:
        return None
    period = settings.GATEWAY["SLOT_TTL_SECONDS"] / 3

    async def beat() -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await limits.refresh_slots(admission)
            except Exception:  # Redis blip: the next beat retries; the slot may expire meanwhile
                log.warning("could not refresh a concurrency slot", extra={"request_id": admission.request_id})

    return asyncio.ensure_future(beat())


async def drain_settling(wait_seconds: float = 10.0) -> None:
    """Wait for in-flight settlements (graceful shutdown)."""
    if _settling:
        await asyncio.wait(list(_settling), timeout=wait_seconds)
