"""A deploy never cuts a long stream silently: the platform ends it with a retryable error."""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import aiohttp

from tests.conftest import Server, usage_row


def test_a_stream_still_running_after_the_grace_period_ends_with_a_retryable_error_event(server, tenants):
    _, _, secret = tenants.make()
    doomed = Server({"GW_SHUTDOWN_GRACE_SECONDS": "0.3"})
    headers = {"Authorization": f"Bearer {secret}", "X-Stream-Resumable": "1"}
    body = {"model": "local-slow", "stream": True,
            "messages": [{"role": "user", "content": "tell me a very long story " * 20}]}
    async def read() -> tuple[str, list[str]]:
        lines: list[str] = []
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{doomed.base_url}/chat/completions", headers=headers, json=body) as response:
                stream_id = response.headers["x-stream-id"]
                async for raw in response.content:
                    line = raw.decode().strip()
                    lines.append(line)
                    if len([x for x in lines if x.startswith("data:")]) == 3:
                        # A deploy: the server is told to stop while the answer is still coming.
                        doomed.proc.send_signal(signal.SIGTERM)
        return stream_id, lines

    try:
        stream_id, lines = asyncio.run(read())
        # and then it stops (uvicorn re-raises the SIGTERM it deferred, once it has shut down)
        assert doomed.proc.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        doomed.stop()
    data = [line for line in lines if line.startswith("data:")]
    ids = [int(line[4:]) for line in lines if line.startswith("id:")]
    assert '"server_shutdown"' in data[-1] and "[DONE]" not in "".join(data)
    assert ids == list(range(1, len(data) + 1))  # the error event has its id too: resumable after it
    row = usage_row(stream_id)
    assert row.http_status == 503 and row.error_code == "server_shutdown" and row.partial
    assert row.completion_tokens >= 2
    # Another process replays the kept events, ending with the same error.
    request = urllib.request.Request(f"{server.base_url}/streams/{stream_id}", headers={**headers, "Last-Event-ID": "0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        replayed = response.read().decode()
    assert replayed.count("data:") == len(data) and '"server_shutdown"' in replayed.rstrip().splitlines()[-1]
