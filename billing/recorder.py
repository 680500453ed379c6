"""Buffer usage rows in a Redis stream: one XADD on the request path, no PostgreSQL round trip.

The writer (billing/writer.py) drains the stream into PostgreSQL in batches, at least once,
deduplicated by request id, so a crash anywhere loses no row and writes none twice.
"""

from __future__ import annotations

import logging

import orjson
from django.conf import settings

from llm_platform.redis import get_async_redis

log = logging.getLogger(__name__)

# Rows that could not reach Redis (outage) wait here and are re-sent with the next record.
_pending: list[bytes] = []
_PENDING_MAX = 100_000


def stream_name() -> str:
    return settings.GATEWAY["USAGE_STREAM"]


async def record(row: dict) -> None:
    payload = orjson.dumps(row, default=str)
    client = get_async_redis()
    try:
        if _pending:
            backlog = list(_pending)
            async with client.pipeline(transaction=False) as pipe:
                for item in backlog:
                    pipe.xadd(stream_name(), {"row": item})
                await pipe.execute()
            del _pending[: len(backlog)]
        await client.xadd(stream_name(), {"row": payload})
    except Exception:
        if len(_pending) < _PENDING_MAX:
            _pending.append(payload)
        log.error("usage buffer unreachable; row kept in memory", extra={"request_id": row.get("request_id"), "pending": len(_pending)})


async def flush_pending() -> None:
    """Re-send rows kept in memory during a Redis outage (called periodically)."""
    if not _pending:
        return
    backlog = list(_pending)
    try:
        async with get_async_redis().pipeline(transaction=False) as pipe:
            for item in backlog:
                pipe.xadd(stream_name(), {"row": item})
            await pipe.execute()
    except Exception:
        return  # still away; next round
    del _pending[: len(backlog)]
    log.info("re-sent buffered usage rows", extra={"rows": len(backlog)})


def pending_count() -> int:
    return len(_pending)
