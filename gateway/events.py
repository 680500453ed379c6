"""Move breaker transitions from their Redis stream into BreakerEvent rows (admin shows them).

Run by the usage writer with its batches: `GatewayConfig.ready` registers `drain_breaker_events`
(`billing.writer.register_drain`), so billing needs no import of the gateway.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings

from llm_platform.redis import move_stream_to_table

from .models import BreakerEvent


def drain_breaker_events(count: int = 500) -> int:
    def to_row(entry_id: str, data: dict) -> BreakerEvent:
        return BreakerEvent(
            lane=data.get("lane", "")[:300], from_state=data.get("from", ""), to_state=data.get("to", ""),
            reason=data.get("reason", "")[:300], event_id=entry_id,
            at=datetime.fromtimestamp(int(data.get("at", "0")) / 1000, tz=UTC))

    return move_stream_to_table(settings.GATEWAY["BREAKER_STREAM"], BreakerEvent, to_row, count)
