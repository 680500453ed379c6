"""Drain the usage stream into PostgreSQL: batched, at least once, deduplicated by request id.

Entries move to the consumer group's pending list when read and are acknowledged only after
their rows are committed. A writer killed in between leaves them pending: on restart it
re-reads its own pending entries first, and any writer claims entries left idle by a dead one.
`request_id` is unique, so a row committed before a crash is never written twice.

Every entry must parse into a `UsageRow` (billing/ledger.py): one with an unknown, missing or
mistyped field is not written with the field dropped, nor dropped itself: it goes to the
dead-letter stream with the reason, logged at ERROR, and so does a row PostgreSQL refuses.

Other apps' streams ride along (the gateway's breaker events): an app registers its drain with
`register_drain` in its `AppConfig.ready()`, so billing imports no other app's code for them.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import orjson
import redis
from django.core.exceptions import ImproperlyConfigured
from django.db import DataError, IntegrityError, close_old_connections, transaction
from django.db.models import Q

from llm_platform.redis import get_redis, move_stream_to_table
from tenants.models import ApiKey

from .ledger import InvalidRow, UsageRow
from .models import UsageRecord
from .recorder import stream_name

log = logging.getLogger(__name__)
GROUP = "usage-writers"
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY_S = 5.0
DEAD_LETTER = "gw:usage:dead"
BATCH = 500  # entries per read (and per transaction)

# Every field of the row has its column (a field without one would be lost on every row).
COLUMNS = tuple(f.name for f in dataclasses.fields(UsageRow))
if unmapped := set(COLUMNS) - {f.attname for f in UsageRecord._meta.concrete_fields}:
    raise ImproperlyConfigured(f"UsageRow field(s) without a UsageRecord column: {', '.join(sorted(unmapped))}")

_drains: list[Callable[[], int]] = []


def register_drain(drain: Callable[[], int]) -> None:
    """Have the writer also run `drain()` (it moves a batch of some stream into its table and
    returns how many entries it moved) with every batch, and until it returns 0 in `drain_all`.
    Called from an app's `AppConfig.ready()`; registering the same function again is a no-op."""
    if drain not in _drains:
        _drains.append(drain)


def run_drains() -> int:
    """One round of budget alerts and of every registered drain; how many entries moved."""
    return drain_alerts() + sum(drain() for drain in _drains)


def default_consumer() -> str:
    return f"writer-{socket.gethostname()}"


def ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(stream_name(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def to_record(row: UsageRow) -> UsageRecord:
    """The one place a UsageRow becomes a UsageRecord: field for column, the time as a datetime.
    PostgreSQL refuses NUL characters in text and jsonb (a prompt may hold one): they are stored
    as U+FFFD rather than losing the row."""
    data = {name: getattr(row, name) for name in COLUMNS}
    data["created_at"] = datetime.fromtimestamp(row.created_at, tz=UTC)
    for name, value in data.items():
        if isinstance(value, str) and "\x00" in value:
            data[name] = value.replace("\x00", "\ufffd")
    if data.get("prompt") is not None:
        raw = orjson.dumps(data["prompt"])
        if b"\\u0000" in raw:
            data["prompt"] = orjson.loads(raw.replace(b"\\u0000", b"\\ufffd"))
    return UsageRecord(**data)


def write_rows(rows: list[UsageRow]) -> int:
    """Insert rows (duplicates ignored) and move keys' last_used_at forward, in one transaction."""
    records = [to_record(row) for row in rows]
    last_used: dict[int, datetime] = {}
    for record in records:
        if record.api_key_id and (record.api_key_id not in last_used or record.created_at > last_used[record.api_key_id]):
            last_used[record.api_key_id] = record.created_at
    with transaction.atomic():
        UsageRecord.objects.bulk_create(records, ignore_conflicts=True)
        for key_id, when in last_used.items():
            ApiKey.objects.filter(pk=key_id).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=when)
            ).update(last_used_at=when)
    return len(records)


_recovered: set[str] = set()  # consumers whose own pending entries this process re-read
_last_claim = 0.0
_group_ready = False


def _read(client: redis.Redis, consumer: str, count: int, block_ms: int | None) -> list:
    global _last_claim
    stream = stream_name()
    # 1. my own entries from before a crash (once per process, and after a failed batch);
    if consumer not in _recovered:
        mine = client.xreadgroup(GROUP, consumer, {stream: "0"}, count=count)
        if mine and mine[0][1]:
            return mine[0][1]
        _recovered.add(consumer)
    # 2. entries a dead writer left idle (checked every few seconds, not every batch);
    if time.monotonic() - _last_claim > CLAIM_EVERY_S:
        _last_claim = time.monotonic()
        claimed = client.xautoclaim(stream, GROUP, consumer, CLAIM_IDLE_MS, "0-0", count=count)
        if claimed and claimed[1]:
            return claimed[1]
    # 3. new ones.
    fresh = client.xreadgroup(GROUP, consumer, {stream: ">"}, count=count, block=block_ms)
    return fresh[0][1] if fresh else []


class SetAside(NamedTuple):
    """An entry that cannot be written, on its way to the dead-letter stream for an operator."""

    entry_id: bytes
    payload: bytes  # as it came (a row PostgreSQL refused: as parsed)
    reason: str
    request_id: str | None


# What one bad row raises (a missing tenant, a value out of a column's range), as opposed to
# PostgreSQL being away (OperationalError), after which the whole batch is retried.
_UNWRITABLE = (IntegrityError, DataError, ValueError, TypeError, ArithmeticError)


def _write_or_set_aside(rows: list[tuple[bytes, UsageRow]]) -> list[SetAside]:
    """Write the batch; if one row cannot be written (a bad row), write the others and set it
    aside, instead of retrying the batch forever."""
    try:
        write_rows([row for _, row in rows])
        return []
    except _UNWRITABLE:
        pass
    aside = []
    for entry_id, row in rows:
        try:
            write_rows([row])
        except _UNWRITABLE as exc:
            aside.append(SetAside(entry_id, row.to_json(), repr(exc), row.request_id))
    return aside


def drain_once(consumer: str | None = None, count: int = BATCH, block_ms: int | None = 1000) -> int:
    """Write one batch; returns how many entries were handled (0 when the stream is idle)."""
    global _group_ready
    client = get_redis()
    consumer = consumer or default_consumer()
    if not _group_ready:
        ensure_group(client)
        _group_ready = True
    run_drains()
    try:
        entries = _read(client, consumer, count, block_ms)
    except redis.ResponseError as exc:
        if "NOGROUP" in str(exc):  # the stream was deleted (a flushed Redis): recreate the group
            _group_ready = False
            return 0
        raise
    if not entries:
        return 0
    ids, rows, aside = [], [], []
    for entry_id, fields in entries:
        ids.append(entry_id)
        payload = fields.get(b"row") if fields else None
        if payload is None:
            continue  # an entry deleted under us: nothing to write
        try:
            rows.append((entry_id, UsageRow.from_json(payload)))
        except InvalidRow as exc:
            aside.append(SetAside(entry_id, payload, f"not a usage row: {exc}", _request_id_of(payload)))
    try:
        if rows:
            aside += _write_or_set_aside(rows)
        # Dead letters and acknowledgements in one transaction: a batch retried (PostgreSQL or
        # Redis away) sets nothing aside twice.
        with client.pipeline(transaction=True) as pipe:
            for item in aside:
                pipe.xadd(DEAD_LETTER, {"row": item.payload, "error": item.reason[:500], "entry": item.entry_id})
            pipe.xack(stream_name(), GROUP, *ids)
            pipe.xdel(stream_name(), *ids)
            pipe.execute()
    except Exception:
        _recovered.discard(consumer)  # the batch stays pending: re-read it next time
        raise
    for item in aside:
        log.error("usage row set aside", extra={"request_id": item.request_id, "entry": item.entry_id.decode(),
                                                "error": item.reason[:200]})
    return len(ids)


def run(consumer: str, stopping: Callable[[], bool], on_failure: Callable[[], None] = lambda: None) -> None:
    """Drain until `stopping()`. After a batch smaller than a full one the writer lingers
    (GW_USAGE_WRITER_LINGER_MS) before reading again, so that under a steady trickle its next
    batch carries the rows of that time in one transaction instead of one or two rows each."""
    from django.conf import settings

    linger = settings.GATEWAY["USAGE_WRITER_LINGER_MS"] / 1000
    while not stopping():
        try:
            handled = drain_once(consumer, count=BATCH, block_ms=500)
        except Exception:  # PostgreSQL or Redis away: entries stay pending; retry soon
            on_failure()
            close_old_connections()
            time.sleep(1)
            continue
        if 0 < handled < BATCH and linger > 0:
            time.sleep(linger)


def drain_alerts(count: int = 500) -> int:
    """Budget alerts raised by settlement -> BudgetAlert rows (unique per period: retry-safe)."""
    from django.conf import settings

    from .models import BudgetAlert

    def to_row(entry_id: str, data: dict) -> BudgetAlert:
        key_id = data.get("key_id")  # "" for the tenant's own cap
        return BudgetAlert(
            tenant_id=int(data["tenant_id"]), scope=data["scope"], api_key_id=int(key_id) if key_id else None,
            period=data["period"],
            threshold=int(data["threshold"]), spent_usd=Decimal(data["spent_nano"]) / 10**9,
            cap_usd=Decimal(data["cap_nano"]) / 10**9, request_id=data.get("request_id", ""))

    return move_stream_to_table(settings.GATEWAY["ALERT_STREAM"], BudgetAlert, to_row, count)


def drain_all(consumer: str | None = None) -> int:
    """Drain until the stream is empty (tests, shutdown)."""
    total = 0
    while handled := drain_once(consumer, block_ms=None):
        total += handled
    while run_drains():
        pass
    return total


def _request_id_of(payload: bytes) -> str | None:
    """The request id of an entry that is not a row, if it can be found (for the log line)."""
    try:
        request_id = orjson.loads(payload).get("request_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return request_id if isinstance(request_id, str) else None
