"""A usage row that cannot reach Redis waits on disk, and survives the process that made it."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import redis as redis_lib
from django.conf import settings

from llm_platform.embedded import EmbeddedRedis
from tests.conftest import Server
from tests.gateway.test_limits import slow_stream


def stream_ids(url: str) -> set[str]:
    rows = redis_lib.Redis.from_url(url).xrange(settings.GATEWAY["USAGE_STREAM"])
    return {json.loads(fields[b"row"])["request_id"] for _, fields in rows}


def spooled(folder) -> list[str]:
    return [line for path in folder.rglob("*.jsonl") for line in path.read_text().splitlines()]


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
