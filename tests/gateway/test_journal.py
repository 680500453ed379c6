"""A call in flight when its process is killed is still billed, exactly once."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from gateway.chat import journal
from tests.conftest import Server, drain_usage


def test_a_call_whose_process_is_killed_mid_stream_is_billed_once_as_worker_lost(server, tenants):
    from billing.models import UsageRecord

    tenant, _, secret = tenants.make()
    doomed = Server({"GW_JOURNAL_TTL_SECONDS": "1"})
    body = {"model": "local-slow", "stream": True,
            "messages": [{"role": "user", "content": "tell me a very long story " * 20}]}

    async def read_until_killed() -> int:
        data = 0
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{doomed.base_url}/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {secret}"}) as response:
                try:
                    async for line in response.content:
                        data += line.startswith(b"data:")
                        if data == 10:
                            await asyncio.sleep(0.5)  # a beat of its journal has seen the stream's progress
                            doomed.proc.kill()  # SIGKILL: no settlement, no shutdown, nothing
                except aiohttp.ClientError:
                    pass
        return data

    try:
        seen = asyncio.run(read_until_killed())
    finally:
        doomed.stop()
    assert seen >= 10
    assert not UsageRecord.objects.filter(tenant=tenant).exists()
    deadline = time.monotonic() + 10
    while not UsageRecord.objects.filter(tenant=tenant).exists():  # another process reaps it
        asyncio.run(journal.reap())
        drain_usage(quiet_s=0)
        assert time.monotonic() < deadline, "the killed call was never billed"
        time.sleep(0.1)
    assert asyncio.run(journal.reap()) == 0  # taken once
    drain_usage()
    (row,) = UsageRecord.objects.filter(tenant=tenant)
    assert row.error_code == "worker_lost" and row.http_status == 500 and row.partial
    assert row.prompt_tokens > 0 and row.completion_tokens >= 10
    assert row.stream and row.model == "local-slow"


def test_a_finished_call_leaves_the_journal(client, flushed_redis):
    client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}])
    deadline = time.monotonic() + 2
    while flushed_redis.zcard(journal.KEY):  # the removal rides with the next write (ms)
        assert time.monotonic() < deadline, "a settled call stayed in the journal"
        time.sleep(0.02)


def test_a_lost_call_is_priced_at_its_lane_prices_for_what_was_seen():
    from decimal import Decimal

    entry = [1, "req_1", time.time() - 2, 7, 9, "sk-gw-abc", "openai", "gpt", "gpt-x", 1000, 10, True, "u", "f",
             "openai", "1.00", "2.00"]
    row = journal._lost_row(entry)
    assert row.cost_usd == Decimal("0.00102")  # 1000 in at $1/M + 10 out at $2/M
    assert row.latency_ms >= 2000 and row.error_code == "worker_lost" and row.partial
