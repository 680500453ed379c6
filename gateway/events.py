"""Move breaker transitions from their Redis stream into BreakerEvent rows (admin shows them)."""

from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings

from llm_platform.redis import get_redis

from .models import BreakerEvent


def drain_breaker_events(count: int = 500) -> int:
    client = get_redis()
    stream = settings.GATEWAY["BREAKER_STREAM"]
    entries = client.xrange(stream, count=count)
    if not entries:
        return 0
    rows = []
    for entry_id, fields in entries:
        data = {k.decode(): v.decode() for k, v in fields.items()}
        rows.append(BreakerEvent(
            lane=data.get("lane", "")[:300], from_state=data.get("from", ""), to_state=data.get("to", ""),
            reason=data.get("reason", "")[:300], event_id=entry_id.decode(),
            at=datetime.fromtimestamp(int(data.get("at", "0")) / 1000, tz=UTC)))
    BreakerEvent.objects.bulk_create(rows, ignore_conflicts=True)
    client.xdel(stream, *(entry_id for entry_id, _ in entries))
    return len(entries)
