"""A usage row that cannot reach Redis waits on disk, and survives the process that made it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from decimal import Decimal

import redis as redis_lib
from django.conf import settings

from billing import recorder
from billing.ledger import UsageRow
from llm_platform.embedded import EmbeddedRedis
from tests.conftest import Server
from tests.gateway.test_limits import slow_stream


def stream_ids(url: str) -> set[str]:
    rows = redis_lib.Redis.from_url(url).xrange(settings.GATEWAY["USAGE_STREAM"])
    return {json.loads(fields[b"row"])["request_id"] for _, fields in rows}


def spooled(folder) -> list[str]:
    return [line for path in folder.rglob("*.jsonl") for line in path.read_text().splitlines()]


def usage_row(request_id: str) -> UsageRow:
    return UsageRow(
        request_id=request_id, provider_request_id="", created_at=time.time(), tenant_id=1, api_key_id=None,
        key_prefix="", provider="local", model="local", upstream_model="local", prompt_tokens=1,
        completion_tokens=1, cached_tokens=0, cache_creation_tokens=0, cost_usd=Decimal(0), ttft_ms=None,
        latency_ms=1.0, finish_reason="stop", http_status=200, error_code="", stream=False, partial=False,
        retries=0, end_user="", feature="", front_door="rest", prompt=None, completion="")


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


def test_a_row_spooled_in_an_outage_reaches_redis_after_its_process_was_killed(routes, tenants, tmp_path):
    _, _, secret = tenants.make()
    store = EmbeddedRedis(tmp_path / "redis", persist=False)
    url = store.start()
    env = {"REDIS_URL": url, "GW_USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    first, successor = Server(env), None
    try:
        async def outage():
            stream = asyncio.ensure_future(slow_stream(first.base_url, secret))
            await asyncio.sleep(0.3)
            store.stop()  # the call in flight settles while Redis is away
            return await stream

        status, request_id = asyncio.run(outage())
        assert status == 200
        lines = wait_for(lambda: spooled(tmp_path / "spool"), 5, "the row was not spooled")
        assert [json.loads(line)["request_id"] for line in lines] == [request_id]
        first.stop(signal.SIGKILL)  # dies before Redis returns: only the disk has the row

        store = EmbeddedRedis(tmp_path / "redis", port=store.port, persist=False)
        store.start()
        assert request_id not in stream_ids(url)
        successor = Server(env)  # adopts the dead process's spool
        wait_for(lambda: request_id in stream_ids(url), 15, "the spooled row never reached Redis")
        wait_for(lambda: not spooled(tmp_path / "spool"), 5, "the spool file was not removed")
    finally:
        for server in (first, successor):
            if server is not None:
                server.stop()
        store.stop()


def test_spooled_rows_are_made_durable_once_a_second_off_the_event_loop(monkeypatch, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the block ends: Redis is away
    monkeypatch.setattr(settings, "REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setitem(settings.GATEWAY, "USAGE_SPOOL_DIR", str(tmp_path))
    monkeypatch.setattr(recorder, "_spool", recorder._Spool())
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), threading.current_thread() is threading.main_thread()))
        real_fsync(fd)

    monkeypatch.setattr(recorder.os, "fsync", spy)

    async def outage() -> list[list[tuple[str, bool]]]:
        seen = []
        await recorder.record(usage_row("r1"))
        await recorder.record(usage_row("r2"))
        seen.append(list(synced))  # written to the page cache, not yet synced
        await recorder.flush_pending()  # the once-a-second round: sync, then try Redis
        seen.append(list(synced))
        await recorder.flush_pending()  # nothing new: no fsync
        seen.append(list(synced))
        await recorder.record(usage_row("r3"))
        await recorder.flush_pending()
        seen.append(list(synced))
        return seen

    before, first, idle, again = asyncio.run(outage())
    (spool_file,) = list(tmp_path.rglob("*.jsonl"))
    folder = str(spool_file.parent)
    assert before == []
    assert first == [(str(spool_file), False), (folder, False)]  # the data and its name, in a thread
    assert idle == first
    assert again == first * 2
    assert [json.loads(line)["request_id"] for line in spooled(tmp_path)] == ["r1", "r2", "r3"]
