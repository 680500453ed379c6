"""Figures, not a test: how long a request takes to become a 503 once Redis freezes.

    /work/main/.venv/bin/python -m llm_platform.testrun tests/hardening/measure_frozen_redis.py -s -q
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from tests.conftest import Server
from tests.support.frozen_redis import FreezableRedisProxy


def _post(url: str, key: str, timeout: float = 15.0) -> tuple[int, float, str]:
    body = json.dumps({"model": "local", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, time.perf_counter() - started, response.read()[:100].decode()
    except urllib.error.HTTPError as exc:
        return exc.code, time.perf_counter() - started, exc.read()[:100].decode()


def test_measure_frozen_redis(routes, tenants, flushed_redis):
    from django.conf import settings

    target = urlparse(settings.REDIS_URL)
    proxy = FreezableRedisProxy(target.hostname, target.port).start()
    db = int(target.path.strip("/") or 0)
    server = Server({"REDIS_URL": proxy.url(db), "GW_LOCAL_CACHE_SECONDS": "30"})
    try:
        _, _, warm_key = tenants.make()
        _, _, cold_key = tenants.make()
        for _ in range(3):
            assert _post(server.url, warm_key)[0] == 200
        proxy.frozen.set()
        rows = []
        for label, key in (("cached key", warm_key), ("cached key again", warm_key),
                           ("key not cached", cold_key), ("key not cached again", cold_key)):
            status, took, body = _post(server.url, key)
            rows.append((label, status, took, body))
        # Requests arriving while others already wait on the frozen Redis, every 100 ms.
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = []
            for _ in range(20):
                futures.append(pool.submit(_post, server.url, warm_key))
                time.sleep(0.1)
            staggered = [f.result() for f in futures]
        times = sorted(took for _, took, _ in staggered)
        rows.append((f"20 staggered: min {times[0]:.2f} median {times[10]:.2f} max", staggered[-1][0], times[-1],
                     str(sorted({status for status, _, _ in staggered}))))
        # Redis refusing connections (down, not frozen).
        proxy.stop()
        for label, key in (("refused: cached key", warm_key), ("refused: not cached", cold_key)):
            status, took, body = _post(server.url, key)
            rows.append((label, status, took, body))
        for label, status, took, body in rows:
            print(f"\n{label:42} {status} {took:6.2f} s  {body[:70]}")
    finally:
        server.stop()
        proxy.stop()
