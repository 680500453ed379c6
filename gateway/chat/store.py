"""The resumable event store: a call's events kept in Redis for a while, so a client that lost
its connection can resume, and an Idempotency-Key replay can follow a stream another process
is still producing.

Each delta event gets a sequence number (an SSE door's `id:`) and is appended, in the
normalized vocabulary, to a Redis stream under the tenant with entry id `<seq>-0`, in small
batches (one pipeline per few ms, not a round trip per chunk). The last entry marks the end:
`done`, or `error` with the error's protocol-neutral fields, so whichever front door replays it
renders the same end in its own shape. A reader resumes after any sequence number with XREAD,
following live events until the end marker (`events`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
import redis.exceptions
from django.conf import settings

from llm_platform.redis import get_async_redis

from ..errors import GatewayError
from ..types import Chunk
from .events import Failed, Finish

log = logging.getLogger("gateway.streams")
FLUSH_AFTER_S = 0.005
_flushing: set[asyncio.Task] = set()


def stream_key(tenant_id: int, stream_id: str) -> str:
    return f"gw:{{t{tenant_id}}}:stream:{stream_id}"


def ttl() -> int:
    return int(settings.GATEWAY["STREAM_TTL_SECONDS"])


class StreamWriter:
    """Buffers (seq, data) and writes them in batches; `finish` writes the end marker."""

    def __init__(self, tenant_id: int, stream_id: str) -> None:
        self.key = stream_key(tenant_id, stream_id)
        self.seq = 0
        self._buffer: list[tuple[int, bytes]] = []
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.failed = False

    def add(self, data: bytes) -> int:
        self.seq += 1
        self._buffer.append((self.seq, data))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._flush_soon())
            _flushing.add(self._task)
            self._task.add_done_callback(_flushing.discard)
        return self.seq

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_AFTER_S)
        await self._flush()

    async def _flush(self, end: str | None = None, detail: bytes = b"") -> None:
        async with self._lock:  # one flush at a time, in order: entry ids must increase
            await self._write(end, detail)

    async def _write(self, end: str | None, detail: bytes) -> None:
        batch, self._buffer = self._buffer, []
        if not batch and end is None:
            return
        try:
            async with get_async_redis().pipeline(transaction=False) as pipe:
                for seq, data in batch:
                    pipe.xadd(self.key, {"d": data}, id=f"{seq}-0")
                if end is not None:
                    pipe.xadd(self.key, {"end": end, "d": detail}, id=f"{self.seq + 1}-0")
                pipe.expire(self.key, ttl())
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            # Resume is best effort; the live stream goes on without it.
            if not self.failed:
                log.warning("could not keep stream events for resume", extra={"stream": self.key, "error": repr(exc)[:200]})
            self.failed = True

    async def finish(self, error: GatewayError | None = None) -> None:
        """Write the end marker: `done`, or `error` with the error's fields."""
        if error is None:
            await self._flush("done")  # a pending timed flush finds an empty buffer later
        else:
            await self._flush("error", orjson.dumps(error.fields()))


async def exists(tenant_id: int, stream_id: str) -> bool:
    return bool(await get_async_redis().exists(stream_key(tenant_id, stream_id)))


async def events(tenant_id: int, stream_id: str, after: int, wait_s: float = 30.0):
    """The kept events after `after` as the session's events (Delta, then Finish or Failed),
    following live ones; ends without an end event when nothing new came for `wait_s`."""
    async for seq, kind, data in replay(tenant_id, stream_id, after, wait_s):
        if kind == "event":
            yield Chunk(raw=data, seq=seq)
        elif kind == "done":
            yield Finish(seq)
        else:
            yield Failed(_stored_error(data), seq)


def _stored_error(data: bytes) -> GatewayError:
    try:
        fields = orjson.loads(data)
        if "status" in fields:
            return GatewayError.from_fields(fields)
        error = fields["error"]  # written by an older process: OpenAI's error body
        return GatewayError(502, str(error.get("message")), type=error.get("type"), code=error.get("code"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return GatewayError(502, "The stream ended with an error.", code="upstream_stream_error")


async def replay(tenant_id: int, stream_id: str, after: int, wait_s: float = 30.0) -> AsyncIterator[tuple[int, str, bytes]]:
    """(seq, kind, data) after `after`: kind is `event`, `done` or `error`; follows live events."""
    client = get_async_redis()
    key = stream_key(tenant_id, stream_id)
    last = f"{after}-0"
    while True:
        result = await client.xread({key: last}, count=500, block=int(wait_s * 1000))
        if not result:
            return  # nothing new for wait_s: the producer is gone
        for entry_id, fields in result[0][1]:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            seq = int(last.split("-", 1)[0])
            end = fields.get(b"end")
            if end is not None:
                yield seq, end.decode(), fields.get(b"d", b"")
                return
            yield seq, "event", fields[b"d"]
