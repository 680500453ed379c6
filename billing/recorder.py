"""Buffer usage rows in a Redis stream: one XADD on the request path, no PostgreSQL round trip.

The writer (billing/writer.py) drains the stream into PostgreSQL in batches, at least once,
deduplicated by request id, so a crash anywhere loses no row and writes none twice.
"""

from __future__ import annotations

import logging

import orjson
from django.conf import settings

from llm_platform.resp import get_resp

log = logging.getLogger(__name__)

# Rows that could not reach Redis (outage) wait here and are re-sent with the next record.
_pending: list[bytes] = []
_PENDING_MAX = 100_000
_resending = False


def stream_name() -> str:
    return settings.GATEWAY["USAGE_STREAM"]


async def record(row: dict) -> None:
    payload = orjson.dumps(row, default=str)
    try:
        if _pending:
            if _resending:  # another task is sending the backlog: queue behind it
                _pending.append(payload)
                return
            await _resend()
        (reply,) = await get_resp().execute_many([("XADD", stream_name(), "*", "row", payload)], defer=True)
        if isinstance(reply, Exception):
            raise reply
    except Exception:
        if len(_pending) < _PENDING_MAX:
            _pending.append(payload)
        log.error("usage buffer unreachable; row kept in memory", extra={"request_id": row.get("request_id"), "pending": len(_pending)})


async def flush_pending() -> None:
    """Re-send rows kept in memory during a Redis outage (called periodically)."""
    if not _pending or _resending:
        return
    try:
        sent = await _resend()
    except Exception:
        return  # still away; next round
    log.info("re-sent buffered usage rows", extra={"rows": sent})


async def _resend() -> int:
    """XADD the rows kept in memory, in one write; they leave memory only once Redis has them."""
    global _resending
    backlog = list(_pending)
    _resending = True
    try:
        replies = await get_resp().execute_many([("XADD", stream_name(), "*", "row", item) for item in backlog])
    finally:
        _resending = False
    failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if failed is not None:
        raise failed  # all stay in memory; the writer drops the duplicates of those that got in
    del _pending[: len(backlog)]
    return len(backlog)


def pending_count() -> int:
    return len(_pending)
