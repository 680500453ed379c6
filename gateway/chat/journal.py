"""The call journal: every admitted call is in Redis until its usage row is, so a process that
dies mid-call (kill -9, an out-of-memory kill) cannot make its calls vanish from billing.

`gw:journal` is a sorted set. Member: a call's compact record (request id, what its row needs,
the completion tokens streamed so far); score: the ms after which the call counts as lost.
A call's member is added within GW_JOURNAL_DELAY_MS of its admission (the calls of those ms in
one ZADD riding with the next Redis write, no round trip of its own) and removed when its usage
row is submitted; a call that ends sooner never touches Redis for this. While the call runs, its process
renews it with every beat (all its calls in one ZADD, every third of GW_JOURNAL_TTL_SECONDS),
refreshing the streamed count. `reap` (every web process, every few seconds) takes the members
whose time has passed, exactly one process getting each (a Lua script), and records a row for
each: error `worker_lost`, partial, the prompt and the tokens seen streamed, priced at the
lane's prices. The writer keeps one row per request id, so a call reaped by mistake (a process
frozen past the TTL) and settled later is never billed twice.

A process killed within GW_JOURNAL_DELAY_MS (5 ms) of admitting a call can still lose it, as a
settled row can within GW_REDIS_DEFER_MS of being written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import orjson
from django.conf import settings

from billing.ledger import UsageRow
from billing.pricing import cost_usd
from billing.recorder import record
from llm_platform.resp import get_resp
from llm_platform.runtime import Runtime

from ..scripts import LuaScript

log = logging.getLogger("gateway.journal")
KEY = "gw:journal"
REAP = LuaScript("journal_reap.lua")
LOST_STATUS = 500
LOST_CODE = "worker_lost"
_VERSION = 1


def ttl_ms() -> int:
    return int(settings.GATEWAY["JOURNAL_TTL_SECONDS"] * 1000)


class _Entry:
    __slots__ = ("call", "member", "streamed")

    def __init__(self, call, member: bytes) -> None:
        self.call, self.member, self.streamed = call, member, 0


def _member(call, streamed: int) -> bytes:
    lane, principal, req = call.lane, call.principal, call.req
    return orjson.dumps([_VERSION, call.ctx.request_id, call.ctx.started_wall, principal.tenant_id, principal.key_id,
                         principal.key_prefix, lane.provider, req.model, lane.upstream_model, call.prompt_tokens,
                         streamed, req.stream, req.user or "", req.feature or "", call.ctx.front_door,
                         str(lane.price_input), str(lane.price_output)])


class Journal:
    """One loop's side of the journal. Calls admitted within the last GW_JOURNAL_DELAY_MS wait in
    `fresh` and go to Redis together, in one ZADD; a call that ends before that never touches
    Redis at all (most calls on a fast lane), and the removals of those that did go in one ZREM."""

    __slots__ = ("loop", "open", "fresh", "gone", "timer", "beat")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.open: dict[str, _Entry] = {}  # in Redis
        self.fresh: dict[str, object] = {}  # admitted, not yet written
        self.gone: list[bytes] = []  # members to remove
        self.timer: asyncio.TimerHandle | None = None
        self.beat: asyncio.Task | None = None

    def _soon(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(settings.GATEWAY["JOURNAL_DELAY_MS"] / 1000, self.flush)

    def flush(self) -> None:
        self.timer = None
        resp = get_resp()
        if self.fresh:
            expiry = int(time.time() * 1000) + ttl_ms()
            scores: list = []
            for request_id, call in self.fresh.items():
                entry = self.open[request_id] = _Entry(call, _member(call, 0))
                scores += (expiry, entry.member)
            self.fresh.clear()
            resp.send_deferred(("ZADD", KEY, *scores))
            if self.beat is None or self.beat.done():
                self.beat = asyncio.ensure_future(_beat(self))
        if self.gone:
            resp.send_deferred(("ZREM", KEY, *self.gone))
            self.gone = []


def _journal(runtime: Runtime) -> Journal:
    if runtime.journal is None:
        runtime.journal = Journal(runtime.loop)
    return runtime.journal


def opened(call) -> None:
    """The call was admitted: it goes into the journal within GW_JOURNAL_DELAY_MS."""
    journal = _journal(call.ctx.runtime or Runtime.current())
    journal.fresh[call.ctx.request_id] = call
    journal._soon()


def closed(call) -> None:
    """Its usage row is on its way: out of the journal (riding with the next write)."""
    journal = (call.ctx.runtime or Runtime.current()).journal
    if journal is None or journal.fresh.pop(call.ctx.request_id, None) is not None:
        return  # never written: nothing to remove
    entry = journal.open.pop(call.ctx.request_id, None)
    if entry is not None:
        journal.gone.append(entry.member)
        journal._soon()


async def _beat(journal: Journal) -> None:
    """Renew this process's calls (and their streamed counts) while any run."""
    while journal.open:
        await asyncio.sleep(ttl_ms() / 3000)
        try:
            await renew(journal)
        except Exception as exc:  # noqa: BLE001 - Redis away: the next beat retries; the TTL is long
            log.warning("could not renew the call journal: %s", exc)


async def renew(journal: Journal | None = None) -> None:
    journal = journal or Runtime.current().journal
    if journal is None or not journal.open:
        return
    expiry = int(time.time() * 1000) + ttl_ms()
    stale, scores = [], []
    for entry in list(journal.open.values()):
        parts = entry.call.outcome.completion_text_parts
        streamed = len(parts) if parts else 0  # a streamed chunk is about one token
        if streamed != entry.streamed:
            stale.append(entry.member)
            entry.member, entry.streamed = _member(entry.call, streamed), streamed
        scores += (expiry, entry.member)
    commands = [("ZREM", KEY, *stale)] if stale else []
    commands += [("ZADD", KEY, *scores), ("PEXPIRE", KEY, ttl_ms() * 2)]
    await get_resp().execute_many(commands)


async def reap(limit: int = 500) -> int:
    """Record a `worker_lost` row for each call whose process stopped renewing it; how many."""
    members = await REAP.run([KEY], [int(time.time() * 1000), limit])
    for member in members or ():
        try:
            row = _lost_row(orjson.loads(member))
        except (orjson.JSONDecodeError, ValueError, TypeError, IndexError) as exc:
            log.error("unreadable call journal entry dropped: %s", exc)
            continue
        log.warning("call lost with its process; recording what is known", extra={"request_id": row.request_id})
        await record(row)
    return len(members or ())


def _lost_row(entry: list) -> UsageRow:
    (_, request_id, created_at, tenant_id, key_id, key_prefix, provider, model, upstream_model, prompt_tokens,
     streamed, stream, end_user, feature, front_door, price_in, price_out) = entry
    cost = cost_usd(Decimal(price_in), Decimal(price_out), Decimal(0), prompt_tokens, streamed, 0, 0)
    return UsageRow(
        request_id=request_id, provider_request_id="", created_at=created_at, tenant_id=tenant_id,
        api_key_id=key_id, key_prefix=key_prefix, provider=provider, model=model, upstream_model=upstream_model,
        prompt_tokens=prompt_tokens, completion_tokens=streamed, cached_tokens=0, cache_creation_tokens=0,
        cost_usd=cost, ttft_ms=None, latency_ms=round(max(0.0, time.time() - created_at) * 1000, 3),  # at least
        finish_reason="", http_status=LOST_STATUS, error_code=LOST_CODE, stream=stream, partial=True, retries=0,
        end_user=end_user, feature=feature, front_door=front_door, prompt=None, completion="")
