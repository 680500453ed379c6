"""Usage rows: buffered in Redis, written at least once and exactly once per request id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC
from decimal import Decimal
from pathlib import Path

from billing.models import UsageRecord
from billing.pricing import cost_usd
from billing.writer import GROUP, drain_all, ensure_group
from llm_platform.redis import get_redis

ROOT = Path(__file__).resolve().parents[2]


def row(tenant, key, request_id: str) -> dict:
    return {
        "request_id": request_id, "provider_request_id": "up-1", "created_at": time.time(),
        "tenant_id": tenant.pk, "api_key_id": key.pk, "key_prefix": key.prefix, "provider": "local",
        "model": "local", "upstream_model": "local", "prompt_tokens": 10, "completion_tokens": 5,
        "cached_tokens": 0, "cache_creation_tokens": 0, "cost_usd": "0.0000123", "ttft_ms": 1.0,
        "latency_ms": 2.0, "finish_reason": "stop", "http_status": 200, "error_code": "",
        "stream": False, "partial": False, "retries": 0, "end_user": "", "feature": "",
        "front_door": "rest", "prompt": None, "completion": "",
    }


def enqueue(rows: list[dict]) -> None:
    import orjson
    from django.conf import settings

    client = get_redis()
    for item in rows:
        client.xadd(settings.GATEWAY["USAGE_STREAM"], {"row": orjson.dumps(item)})


def test_cost_is_exact_decimal_arithmetic():
    cost = cost_usd(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), 1_000_003, 333, cached_tokens=1000)
    assert cost == (Decimal(1_000_003 - 1000) * Decimal("0.15") + 1000 * Decimal("0.075") + 333 * Decimal("0.60")) / 1_000_000
    assert isinstance(cost, Decimal)


def test_a_duplicate_entry_writes_one_row(tenants):
    tenant, key, _ = tenants.make()
    request_id = f"dup-{uuid.uuid4().hex}"
    enqueue([row(tenant, key, request_id), row(tenant, key, request_id)])
    drain_all("test-writer")
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert UsageRecord.objects.get(request_id=request_id).cost_usd == Decimal("0.0000123")


def test_entries_read_by_a_writer_that_died_are_written_on_restart(tenants):
    """A writer that read a batch and died before committing it leaves the entries pending."""
    from django.conf import settings

    tenant, key, _ = tenants.make()
    ids = [f"crash-{uuid.uuid4().hex}" for _ in range(3)]
    enqueue([row(tenant, key, i) for i in ids])
    client = get_redis()
    ensure_group(client)
    read = client.xreadgroup(GROUP, "doomed-writer", {settings.GATEWAY["USAGE_STREAM"]: ">"}, count=100)
    assert len(read[0][1]) >= 3  # the doomed writer took them, then "died"
    assert UsageRecord.objects.filter(request_id__in=ids).count() == 0
    drain_all("doomed-writer")  # restarted under its stable consumer name
    assert UsageRecord.objects.filter(request_id__in=ids).count() == 3


def test_killed_writer_process_loses_no_row_and_writes_none_twice(tenants):
    """Kill -9 the real writer while it works; restart it; every row appears exactly once."""
    from django.conf import settings

    tenant, key, _ = tenants.make()
    ids = [f"kill-{uuid.uuid4().hex}" for _ in range(3000)]
    enqueue([row(tenant, key, i) for i in ids])
    db = settings.DATABASES["default"]
    env = {**os.environ, "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"}
    command = [sys.executable, "manage.py", "usage_writer", "--consumer", "killable"]
    writer = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while UsageRecord.objects.filter(request_id__in=ids).count() == 0:  # let it get going
        assert time.monotonic() < deadline
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    restarted = subprocess.run([*command, "--once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert restarted.returncode == 0, restarted.stderr
    assert UsageRecord.objects.filter(request_id__in=ids).count() == 3000
    pending = get_redis().xpending(settings.GATEWAY["USAGE_STREAM"], GROUP)
    assert pending["pending"] == 0


def test_last_used_at_only_moves_forward(tenants):
    from datetime import datetime

    from billing.ledger import UsageRow
    from billing.writer import write_rows

    tenant, key, _ = tenants.make()
    later, earlier = row(tenant, key, f"a-{uuid.uuid4().hex}"), row(tenant, key, f"b-{uuid.uuid4().hex}")
    earlier["created_at"] = later["created_at"] - 100
    write_rows([UsageRow.from_dict(later)])
    write_rows([UsageRow.from_dict(earlier)])
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(later["created_at"], tz=UTC)


def test_a_row_that_cannot_be_written_is_set_aside_and_the_rest_written(tenants):
    from billing.writer import DEAD_LETTER

    tenant, key, _ = tenants.make()
    good = row(tenant, key, f"good-{uuid.uuid4().hex}")
    bad = row(tenant, key, f"bad-{uuid.uuid4().hex}")
    bad["tenant_id"] = 10**9  # a tenant that does not exist
    enqueue([bad, good])
    drain_all("test-writer")
    assert UsageRecord.objects.filter(request_id=good["request_id"]).exists()
    assert not UsageRecord.objects.filter(request_id=bad["request_id"]).exists()
    dead = [fields for _, fields in get_redis().xrange(DEAD_LETTER)]
    assert any(bad["request_id"].encode() in fields[b"row"] for fields in dead)
    drain_all("test-writer")  # nothing left to retry forever


def _writer_transactions(tenant, key, linger_ms: str) -> int:
    """Run the real writer with this linger while 60 rows trickle in (one every 10 ms); how many
    transactions wrote them (rows committed together share PostgreSQL's `xmin`)."""
    from django.conf import settings
    from django.db import connection

    ids = [f"trickle-{uuid.uuid4().hex}" for _ in range(60)]
    db = settings.DATABASES["default"]
    env = {**os.environ, "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "GW_USAGE_WRITER_LINGER_MS": linger_ms}
    writer = subprocess.Popen([sys.executable, "manage.py", "usage_writer", "--consumer", f"trickle-{linger_ms}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "running" in writer.stdout.readline()
        enqueue([row(tenant, key, f"warm-{uuid.uuid4().hex}")])  # the writer is at its blocking read
        time.sleep(0.3)
        for request_id in ids:
            enqueue([row(tenant, key, request_id)])
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while UsageRecord.objects.filter(request_id__in=ids).count() < len(ids):
            assert time.monotonic() < deadline, "the writer did not write every row"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=10)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT xmin::text) FROM billing_usagerecord WHERE request_id = ANY(%s)", [ids])
        return cursor.fetchone()[0]


def test_the_writer_gathers_a_trickle_of_rows_into_few_transactions(tenants):
    """Rows arriving one by one are written a linger's worth at a time: ~0.6 s of rows at a
    250 ms linger take a handful of transactions; with no linger, close to one per row."""
    tenant, key, _ = tenants.make()
    lingering = _writer_transactions(tenant, key, "250")
    eager = _writer_transactions(tenant, key, "0")
    assert lingering <= 6, lingering
    assert eager >= max(12, 3 * lingering), (eager, lingering)  # a slow host batches a little by itself
