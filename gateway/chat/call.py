"""One provider call of the chat session: route, pre-flight, admit, the resilience ladder, settle.

    async with open_call(principal, req, ctx) as call:
        completion = await call.complete()        # or: async for chunk in call.stream()
    # leaving the block settles: the usage row is recorded, whatever happened (shielded from
    # cancellation, so a client that hangs up never loses its row).

Front doors do not call this directly: they go through `gateway.chat.session.ChatSession`,
which adds idempotency, the event store, stream validation and cancellation around it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal

import redis.exceptions
from django.conf import settings

from billing.ledger import UsageRow
from billing.pricing import cost_usd
from billing.recorder import record, rider
from tenants.principal import Principal

from .. import limits, resilience
from ..errors import GatewayError
from ..lane_policy import policy_for
from ..providers.base import UpstreamError, get_provider
from ..routing import LaneSpec, Route, routes
from ..scripts import ScriptCall, run_scripts
from ..structured import complete_structured, schema_of
from ..tokens import count_messages, count_text
from ..types import ChatRequest, Chunk, Completion, Outcome, Usage
from . import journal
from .cancel import CLIENT_GONE as CLIENT_GONE_REASON
from .cancel import CancelToken

log = logging.getLogger("gateway.calls")
_LOGGED = ("request_id", "tenant_id", "key_prefix", "model", "provider", "http_status", "error_code", "latency_ms",
           "prompt_tokens", "completion_tokens", "stream", "partial")
CLIENT_GONE = 499  # nginx's convention for "the client closed the request"
_settling: set[asyncio.Task] = set()


@dataclass(slots=True)
class CallContext:
    request_id: str
    front_door: str = "openai"
    cancel: CancelToken | None = None  # who may stop the call, and why it stopped
    runtime: object | None = None  # llm_platform.runtime.Runtime  # the running loop's, when the session found it already
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
        self._done = False
        self._next_lane = False
        self._last_error: UpstreamError | None = None
        self._earlier_usage: list[Usage] = []
        self._first_ticket: resilience.Ticket | resilience.Unavailable | None = None
        self._reports: list[ScriptCall] = []
        self._called = False  # a provider call was started
        self._settlement: tuple[asyncio.Future | None, UsageRow] | None = None  # submitted: its reply, the row
        self.schema = schema_of(req)

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
        """Admission and the first lane's health check, in one Redis round trip (both go out in
        the write at the end of this loop iteration)."""
        admission = admitted = None
        tokens = self.prompt_tokens + self.reserve_tokens
        if settings.GATEWAY["LIMITS_ENABLED"]:
            estimate = limits.estimate_nano(self.lane, self.prompt_tokens, self.reserve_tokens)
            admission, operation = limits.prepare_admission(self.principal, self.ctx.request_id, tokens, estimate)
            if operation is not None:
                admitted = limits.submit(operation, abandoned=lambda reply: _background(self._give_back(admission, reply)))
        trusted = resilience.trusted_ticket(self.route.lanes[0]) if resilience_enabled() else None
        if trusted is not None:
            self._first_ticket = trusted
        elif resilience_enabled():
            try:
                (result,) = await run_scripts([resilience.acquire_call(self.route.lanes[0], tokens)])
            except (redis.exceptions.RedisError, OSError) as exc:
                result = exc
            except BaseException:  # cancelled: nobody will read the admission's reply
                if admitted is not None:
                    admitted.cancel()
                raise
            self._first_ticket = resilience.ticket_from(self.route.lanes[0], result)
            resilience.note_ticket(self._first_ticket)
        if admitted is not None:
            try:
                result = await admitted
            except (redis.exceptions.RedisError, OSError) as exc:
                result = exc
            try:
                limits.finish_admission(admission, result)
            except GatewayError:
                if isinstance(self._first_ticket, resilience.Ticket) and self._first_ticket.probe:
                    await resilience.report(self._first_ticket, "limited", "refused at admission")
                raise
        self.admission = admission

    async def _give_back(self, admission: limits.Admission, reply) -> None:
        """The client left while Redis was admitting it: give back what the admission reserved
        (the slot, the tokens, the estimated spend); the usage row says 499, nothing used."""
        try:
            limits.finish_admission(admission, reply)
        except GatewayError:
            return  # refused: nothing was reserved
        self.admission = admission
        self.status, self.error_code = CLIENT_GONE, "client_disconnected"
        await self.settle()

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's own headers, as the response carries them (`http.header_list` pairs)."""
        headers = [*self.admission.header_pairs] if self.admission else []
        headers += ((b"x-upstream-model", (self.outcome.upstream_model or self.lane.upstream_model).encode()),
                    (b"x-upstream-provider", self.lane.provider.encode()))
        if self.retries:
            headers.append((b"x-gateway-retries", b"%d" % self.retries))
        if self.trimmed:
            headers.append((b"x-context-trimmed-messages", b"%d" % self.trimmed))
        return headers

    def _fresh_outcome(self) -> Outcome:
        return Outcome(completion_text_parts=[] if self.req.stream or self.principal.store_content else None)

    async def _lanes(self):
        """Yield (ticket, attempt) in order: retries on a lane, then the next lane.

        The caller reports each attempt's result through `self._attempt_failed` / success.
        Raises the last provider error, or 503 when no lane could even be tried.
        """
        first_policy = policy_for(self.route.lanes[0])
        deadline = time.monotonic() + first_policy.retry.max_total_s
        skipped: list[resilience.Unavailable] = []
        self._last_error = None
        tried_any = False
        for lane in self.route.lanes:
            if not settings.GATEWAY["RESILIENCE_ENABLED"]:
                ticket = resilience.Ticket(lane, policy_for(lane))
            elif self._first_ticket is not None:
                ticket, self._first_ticket = self._first_ticket, None  # checked at admission
            else:
                # A later lane seen healthy moments ago is trusted as the first one is.
                ticket = (resilience.trusted_ticket(lane)
                          or await resilience.acquire(lane, self.prompt_tokens + self.reserve_tokens))
            if isinstance(ticket, resilience.Unavailable):
                skipped.append(ticket)
                continue
            for attempt in range(ticket.policy.retry.max_attempts):
                if tried_any:
                    self.retries += 1
                tried_any = self._called = True
                self._next_lane = False
                yield ticket
                error = self._last_error
                if error is None or self._next_lane:
                    break
                left = deadline - time.monotonic()
                if attempt + 1 >= ticket.policy.retry.max_attempts or not error.retryable:
                    break
                pause = resilience.backoff_s(attempt, ticket.policy, error.retry_after)
                if pause >= left:
                    break
                await asyncio.sleep(pause)
                if resilience_enabled():
                    again = await resilience.acquire(lane, self.prompt_tokens + self.reserve_tokens)
                    if isinstance(again, resilience.Unavailable):
                        skipped.append(again)
                        break
                    ticket = again
            if self._done or time.monotonic() >= deadline:
                break
            if self._last_error is not None and not self._may_fall_back(self._last_error):
                break
        if self._done:
            return
        if self._last_error is not None:
            raise self._last_error
        wait_ms = min((u.retry_after_ms for u in skipped), default=1000)
        retry = str(max(1, math.ceil(wait_ms / 1000)))
        raise GatewayError(
            503, f"Every upstream lane for model '{self.req.model}' is unavailable right now "
                 f"({'; '.join(u.text for u in skipped)}). Retry in {retry} s.",
            type="server_error", code="all_lanes_unavailable", headers={"Retry-After": retry})

    @staticmethod
    def _may_fall_back(error: UpstreamError) -> bool:
        """Another lane can help with provider trouble, not with a request the provider refused."""
        return error.retryable or error.status >= 500 or error.upstream_status in (401, 403, 404, 429)

    async def _settle_attempt(self, ticket, started: float, exc: BaseException | None) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        if isinstance(exc, UpstreamError):
            self._last_error = exc
            if exc.upstream_status == 429:
                self._next_lane = True  # hold this lane for every process; try the next one now
        elif exc is None:
            self._last_error = None
            self._done = True
        if resilience_enabled():
            outcome, detail = resilience.outcome_of(exc, latency_ms, ticket.policy)
            hold_ms = int((exc.retry_after or 1) * 1000) if outcome == "limited" else 0
            if outcome == "ok" and not ticket.probe:
                resilience.count_success(ticket)  # counted here, sent once a second
            elif outcome == "ok":
                self._reports.append(resilience.report_call(ticket, outcome, detail))  # with settlement
            else:
                resilience.note_failure(ticket.lane)
                _background(resilience.run_reports([resilience.report_call(ticket, outcome, detail, hold_ms)]))

    async def complete(self) -> Completion:
        """The answer; with a strict JSON schema, validated and repaired once if needed."""
        if self.schema is None:
            completion = await self._complete_once(self.req)
            self.release_slot_first()
            return completion

        async def once(req: ChatRequest) -> Completion:
            if self.outcome.usage is not None:
                self._earlier_usage.append(self.outcome.usage)  # the first call is billed too
            return await self._complete_once(req)

        completion, repairs = await complete_structured(once, self.req)
        self.retries += repairs
        self.release_slot_first()
        return completion

    async def _complete_once(self, req: ChatRequest) -> Completion:
        self._done = False
        async for ticket in self._lanes():
            self.lane, self.outcome = ticket.lane, self._fresh_outcome()
            provider = get_provider(ticket.lane, self.ctx.runtime)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(ticket.policy.total_s):
                    completion = await provider.complete(ticket.lane, req, self.outcome)
            except TimeoutError:
                await self._settle_attempt(ticket, started, _timeout(ticket))
                continue
            except UpstreamError as exc:
                await self._settle_attempt(ticket, started, exc)
                if not self._may_fall_back(exc) and not exc.retryable:
                    raise
                continue
            await self._settle_attempt(ticket, started, None)
            return completion
        raise AssertionError("unreachable: _lanes raises when no lane answered")

    async def stream(self) -> AsyncIterator[Chunk]:
        """Chunks for the client; retries and fallback only until the first chunk exists."""
        self._done = False
        chunks = None
        async for ticket in self._lanes():
            self.lane, self.outcome = ticket.lane, self._fresh_outcome()
            provider = get_provider(ticket.lane, self.ctx.runtime)
            started = time.perf_counter()
            chunks = provider.stream(ticket.lane, self.req, self.outcome)
            try:
                # The adapter enforces the idle timeout on each read; this bounds the whole wait.
                async with asyncio.timeout(ticket.policy.total_s):
                    first = await anext(chunks)
            except (TimeoutError, StopAsyncIteration) as exc:
                await chunks.aclose()
                await self._settle_attempt(ticket, started, _timeout(ticket) if isinstance(exc, TimeoutError)
                                           else UpstreamError(502, "The provider sent an empty stream.", code="upstream_empty", retryable=True))
                continue
            except UpstreamError as exc:
                if exc.status >= 500:
                    exc.retryable = True  # nothing reached the client yet: another try is safe
                await self._settle_attempt(ticket, started, exc)
                if not self._may_fall_back(exc) and not exc.retryable:
                    raise
                continue
            break
        else:
            raise AssertionError("unreachable: _lanes raises when no lane answered")
        served = ticket
        finished = False
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(served.policy.total_s):
                if first.usage_only:
                    finished = True
                if not first.usage_only or self.req.include_usage:
                    yield first
                async for chunk in chunks:
                    if chunk.usage_only:
                        finished = True
                        if not self.req.include_usage:
                            continue
                    yield chunk
        except TimeoutError:
            failure = _timeout(served)
            raise failure from None
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await chunks.aclose()
            if failure is None or isinstance(failure, UpstreamError):
                self._done = failure is None
                await self._settle_attempt(served, started, failure)
        if not finished and self.outcome.finish_reason is None:
            self.partial = True
        if self.schema is None:  # else the front door checks the whole output first (it may fail it)
            self.release_slot_first()  # the front door writes the stream's end after this

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, GatewayError):
            self.status, self.error_code = exc.status, exc.code or exc.type
        elif isinstance(exc, asyncio.CancelledError | ConnectionError | GeneratorExit):
            # The client left (or a Stop button, a cancelled job: the token says which).
            token = self.ctx.cancel
            self.status = CLIENT_GONE
            self.error_code = token.reason if token is not None and token.reason else CLIENT_GONE_REASON
            if self._called:
                self.partial = True  # the provider saw the prompt: billed for what it consumed
        else:
            self.status, self.error_code = 500, "internal_error"
        if self.req.stream and self.outcome.first_token_at is not None:
            self.partial = True

    def usage(self) -> Usage:
        """All provider calls' usage (a structured-output repair is a second call)."""
        usage = self._last_usage()
        for earlier in self._earlier_usage:
            usage = Usage(usage.prompt_tokens + earlier.prompt_tokens, usage.completion_tokens + earlier.completion_tokens,
                          usage.cached_tokens + earlier.cached_tokens, usage.cache_creation_tokens + earlier.cache_creation_tokens)
        return usage

    def _last_usage(self) -> Usage:
        """The provider's count; when a call ended before it reported one, count what was sent."""
        if self.outcome.usage is not None:
            return self.outcome.usage
        if self.outcome.first_token_at is None and self.status >= 400 and self.status != CLIENT_GONE:
            return Usage()
        if not self._called:  # no provider saw the prompt
            return Usage()
        prompt = self.prompt_tokens or count_messages(self.req.messages, self.lane.upstream_model, self.req.tools)
        text = "".join(self.outcome.completion_text_parts or ())
        return Usage(prompt_tokens=prompt, completion_tokens=count_text(text, self.lane.upstream_model))

    def row(self, usage: Usage, cost: Decimal) -> UsageRow:
        lane = self.lane
        now = time.perf_counter()
        first = self.outcome.first_token_at
        store = self.principal.store_content
        return UsageRow(
            request_id=self.ctx.request_id,
            provider_request_id=self.outcome.provider_request_id or "",
            created_at=self.ctx.started_wall,
            tenant_id=self.principal.tenant_id,
            api_key_id=self.principal.key_id,
            key_prefix=self.principal.key_prefix,
            provider=lane.provider,
            model=self.req.model,
            upstream_model=self.outcome.upstream_model or lane.upstream_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cache_creation_tokens=usage.cache_creation_tokens,
            cost_usd=cost,
            ttft_ms=round((first - self.ctx.started) * 1000, 3) if first else None,
            latency_ms=round((now - self.ctx.started) * 1000, 3),
            finish_reason=self.outcome.finish_reason or "",
            http_status=self.status,
            error_code=self.error_code or "",
            stream=self.req.stream,
            partial=self.partial,
            retries=self.retries,
            end_user=self.req.user or "",
            feature=self.req.feature or "",
            front_door=self.ctx.front_door,
            prompt=self.req.messages if store else None,
            completion="".join(self.outcome.completion_text_parts or ()) if store else "",
        )

    def release_slot_first(self) -> None:
        """The provider is done and the answer is about to end: if this request's slot must be
        free before its client can send another request (`Admission.release_first`), write the
        settlement to Redis now, before the front door writes the answer's last bytes."""
        if self.admission is not None and self.admission.release_first and self._settlement is None:
            self._settlement = self._submit_settlement(at_once=True)

    def _submit_settlement(self, at_once: bool = False) -> tuple[asyncio.Future | None, UsageRow]:
        """Log the call and submit its settlement (None if it could not be prepared); the row."""
        journal.closed(self)
        usage = self.usage()
        lane = self.lane
        cost = cost_usd(lane.price_input, lane.price_output, lane.price_cached_input, usage.prompt_tokens,
                        usage.completion_tokens, usage.cached_tokens, usage.cache_creation_tokens)
        row = self.row(usage, cost)
        if log.isEnabledFor(logging.INFO):  # the extra fields cost a dict per call; skip it when not logged
            log.info("chat call", extra={k: getattr(row, k) for k in _LOGGED})
        settled = None
        if self.admission is not None and self.admission.lease is not None:
            limits.settle_locally(self.admission, usage.total_tokens, cost)  # the row: recorded as it is
        elif self.admission is not None:
            try:
                settled = limits.submit(limits.settle_operation(self.admission, usage.total_tokens, cost),
                                        defer=not at_once, at_once=at_once, rider=rider(row))
            except Exception:  # a bug must not cost the row: record it alone; the slot expires
                log.exception("could not prepare settlement; recording the usage row alone",
                              extra={"request_id": row.request_id})
        return settled, row

    async def settle(self) -> None:
        """Settle (unless `release_slot_first` did) and record the usage row, whatever happens."""
        if self._settlement is None:  # an error, a client gone: at once too if a limit is crowded
            self._settlement = self._submit_settlement(at_once=self.admission is not None
                                                       and self.admission.release_first)
        settled, row = self._settlement
        if self._reports:  # lane reports: in the same write as the settlement
            try:
                await run_scripts(self._reports, defer=True)
            except (redis.exceptions.RedisError, OSError):
                log.warning("lane reports lost", extra={"request_id": row.request_id})
        if settled is not None:  # its row rode in the same write: in the stream, or spooled if that failed
            try:
                await settled
            except (redis.exceptions.RedisError, OSError):  # slots expire, refunds are lost
                log.warning("settlement failed", extra={"request_id": row.request_id})
            return
        await record(row)


@asynccontextmanager
async def open_call(principal: Principal, req: ChatRequest, ctx: CallContext):
    route = await resolve_route(principal, req)
    call = ChatCall(principal, req, route, ctx)
    call.preflight()
    await call.admit()  # a refusal here raises before anything is charged or recorded
    journal.opened(call)  # from here on, the call ends as a usage row even if this process dies
    holds_slots = _hold_slots(call.admission)
    try:
        yield call
    except BaseException as exc:
        call.fail(exc)
        raise
    finally:
        if holds_slots:
            _held.pop(call.admission.request_id, None)
        # Settle in its own task: a cancelled request (client gone) cannot interrupt it.
        await asyncio.shield(_background(call.settle()))  # if we are cancelled here, it still finishes


def _background(coro) -> asyncio.Task:
    """Run a coroutine in its own task, kept referenced until done (and drained at shutdown)."""
    task = asyncio.ensure_future(coro)
    _settling.add(task)
    task.add_done_callback(_settling.discard)
    return task


def resilience_enabled() -> bool:
    return settings.GATEWAY["RESILIENCE_ENABLED"]


def _timeout(ticket) -> UpstreamError:
    return UpstreamError(504, f"The provider did not answer within {ticket.policy.total_s:.0f} s.",
                         code="upstream_timeout", retryable=True)


# Admissions in flight that hold concurrency slots. Slots expire (so a killed worker's free
# themselves); one heartbeat per process keeps the live ones alive, in one write per beat.
_held: dict[str, limits.Admission] = {}
_heartbeat: asyncio.Task | None = None


def _hold_slots(admission: limits.Admission | None) -> bool:
    global _heartbeat
    if admission is None or not admission.slot_keys:
        return False
    _held[admission.request_id] = admission
    if _heartbeat is None or _heartbeat.done():
        _heartbeat = asyncio.ensure_future(_beat())
    return True


async def _beat() -> None:
    period = settings.GATEWAY["SLOT_TTL_SECONDS"] / 3
    while _held:
        await asyncio.sleep(period)
        try:
            await limits.refresh_slots(list(_held.values()))
        except (redis.exceptions.RedisError, OSError):  # the next beat retries; a slot may expire meanwhile
            log.warning("could not refresh concurrency slots", extra={"calls": len(_held)})


async def drain_settling(wait_seconds: float = 10.0) -> None:
    """Wait for in-flight settlements (graceful shutdown)."""
    if _settling:
        await asyncio.wait(list(_settling), timeout=wait_seconds)
