"""`Idempotency-Key` for POST /v1/chat/completions: one provider call per key, replays for the rest.

A request with the header claims the key in Redis before anything is charged (one atomic
EVALSHA, lua/idempotency_claim.lua), under the tenant: `gw:{t<tenant>}:idem:<sha256 of key>`.
The claim records the request's fingerprint (sha256 of its canonical JSON body), the claiming
request id and whether it streams. It holds a short lease, renewed while the call runs, so a
process that dies mid-call frees the key by itself within LEASE_SECONDS.

- A 200 completes the claim: the record becomes the response (JSON body byte-for-byte and its
  headers; for a stream only the marker, the events being in the stream store under the
  request id) and lives GW_IDEMPOTENCY_TTL_SECONDS.
- Anything else (an error status, an exception, a stream that ended with an error event, a
  client that left a non-resumable call) releases the key: the next attempt runs afresh.
- Renewing, completing and releasing go through lua/idempotency_settle.lua, which acts only
  if the key still holds this request's exact claim.

Record format: the metadata as JSON, then, for a completed JSON response, b"\\n" and the body
(orjson never writes a raw newline, so the first one separates them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass

import orjson
import redis.exceptions
from django.conf import settings

from llm_platform.redis import get_async_redis

from .errors import GatewayError
from .scripts import LuaScript

log = logging.getLogger("gateway.idempotency")

HEADER = "idempotency-key"
PARAM = "Idempotency-Key"
LEASE_SECONDS = 30.0  # a running claim's lease; renewed every third of it while the call runs
POLL_FIRST_S, POLL_MAX_S = 0.025, 0.05  # how often a duplicate looks at a running claim
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_NOT_KEPT = frozenset({b"content-type", b"content-length", b"x-request-id"})

CLAIM = LuaScript("idempotency_claim.lua")
SETTLE = LuaScript("idempotency_settle.lua")
_settling: set[asyncio.Task] = set()


def check_key(value: str) -> str:
    if not _KEY.match(value) or not value.strip():
        raise GatewayError(400, "Invalid Idempotency-Key header: 1-255 printable ASCII characters.",
                           code="invalid_idempotency_key", param=PARAM)
    return value


def fingerprint(data: dict) -> str:
    """The request's identity: sha256 of its parsed body as canonical JSON (keys sorted).

    The boundary refuses bodies nested deeper than orjson writes (validation.MAX_DEPTH); should
    one get here, it is the client's 400, not a crash."""
    try:
        canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        raise GatewayError(400, "The request body is nested too deeply to be identified for its Idempotency-Key.",
                           param=PARAM) from None
    return hashlib.sha256(canonical).hexdigest()


def redis_key(tenant_id: int, key: str) -> str:
    return f"gw:{{t{tenant_id}}}:idem:{hashlib.sha256(key.encode()).hexdigest()}"


def ttl_ms() -> int:
    return int(settings.GATEWAY["IDEMPOTENCY_TTL_SECONDS"] * 1000)


def wait_limit_s() -> float:
    """How long a duplicate waits for the first request before answering 409."""
    return float(settings.GATEWAY["UPSTREAM_TIMEOUT"])


@dataclass(slots=True)
class Record:
    """What the key holds: a running claim or a completed response."""

    state: str  # running | done
    fingerprint: str
    request_id: str
    stream: bool
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Record:
        head, _, body = raw.partition(b"\n")
        meta = orjson.loads(head)
        return cls(meta["state"], meta["fp"], meta["rid"], meta["stream"], meta.get("headers") or {}, body)


def _unavailable() -> GatewayError:
    return GatewayError(503, "The platform's idempotency store is unreachable; retry shortly.", type="server_error",
                        code="idempotency_unavailable", headers={"Retry-After": "2"})


def reused() -> GatewayError:
    return GatewayError(422, "This Idempotency-Key was already used with a different request body; use a new key "
                             "for a different request.", code="idempotency_key_reused", param=PARAM)


def in_progress() -> GatewayError:
    return GatewayError(409, "A request with this Idempotency-Key is still in progress; retry shortly.",
                        code="idempotency_key_in_use", param=PARAM, headers={"Retry-After": "1"})


class Claim:
    """This request holds the key: keep the lease alive while the call runs, then settle it."""

    def __init__(self, key: str, value: bytes, fp: str, request_id: str, stream: bool) -> None:
        self.key = key
        self.value = value
        self.fingerprint = fp
        self.request_id = request_id
        self.stream = stream
        self._beat: asyncio.Task | None = None

    async def _settle(self, op: str, ms: int = 0, record: bytes = b"") -> bool:
        return bool(await SETTLE.run([self.key], [self.value, op, ms, record]))

    def keep_alive(self) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(LEASE_SECONDS / 3)
                try:
                    if not await self._settle("renew", int(LEASE_SECONDS * 1000)):
                        return  # no longer ours (the lease ran out during a Redis blip)
                except (redis.exceptions.RedisError, OSError):  # the next beat retries
                    log.warning("could not renew an idempotency claim", extra={"request_id": self.request_id})

        self._beat = asyncio.ensure_future(beat())

    def _completed(self, headers: dict[str, str], body: bytes) -> bytes:
        meta = orjson.dumps({"state": "done", "fp": self.fingerprint, "rid": self.request_id, "stream": self.stream,
                             "headers": headers, "at": time.time()})
        return meta + b"\n" + body if body else meta

    async def finish(self, success: bool, headers: list | None = None, body: bytes = b"") -> None:
        """Complete (a 200) or release (anything else), in a task a cancelled request cannot stop."""
        if self._beat is not None:
            self._beat.cancel()
        if success:
            kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers or () if k not in _NOT_KEPT}
            op, ms, record = "complete", ttl_ms(), self._completed(kept, body)
        else:
            op, ms, record = "release", 0, b""

        async def settle() -> None:
            try:
                await self._settle(op, ms, record)
            except (redis.exceptions.RedisError, OSError):  # a completion is lost (the key frees itself)
                log.warning("could not settle an idempotency claim", extra={"request_id": self.request_id, "op": op})

        task = asyncio.ensure_future(settle())
        _settling.add(task)
        task.add_done_callback(_settling.discard)
        await asyncio.shield(task)  # if we are cancelled here, the task still finishes


async def claim(tenant_id: int, key: str, fp: str, request_id: str, stream: bool) -> tuple[Claim | None, Record | None]:
    """(our claim, None) when this request now holds the key; (None, the record) otherwise.

    The same key with another body is a 422 whatever the record's state.
    """
    rkey = redis_key(tenant_id, key)
    value = orjson.dumps({"state": "running", "fp": fp, "rid": request_id, "stream": stream, "at": time.time()})
    try:
        raw = await CLAIM.run([rkey], [value, int(LEASE_SECONDS * 1000)])
    except (redis.exceptions.RedisError, OSError):
        raise _unavailable() from None
    if raw is None:
        return Claim(rkey, value, fp, request_id, stream), None
    record = Record.parse(raw)
    if record.fingerprint != fp:
        raise reused()
    return None, record


async def peek(tenant_id: int, key: str) -> Record | None:
    try:
        raw = await get_async_redis().get(redis_key(tenant_id, key))
    except (redis.exceptions.RedisError, OSError):
        raise _unavailable() from None
    return None if raw is None else Record.parse(raw)


async def wait_done(tenant_id: int, key: str, fp: str, deadline: float) -> Record | None:
    """Poll a running claim until it completes (the record) or goes (None: released, expired, or
    claimed since by another request); 409 at the deadline."""
    pause = POLL_FIRST_S
    while True:
        if time.monotonic() >= deadline:
            raise in_progress()
        await asyncio.sleep(pause)
        pause = min(POLL_MAX_S, pause * 1.25)
        record = await peek(tenant_id, key)
        if record is None or record.fingerprint != fp:
            return None
        if record.state == "done":
            return record
