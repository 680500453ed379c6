"""What one request's limits cost, without HTTP: Redis's time in lua/limits.lua, and the client's CPU.

    .venv/bin/python bench/limits_script.py [--requests 3000] [--batches 1,3,8] [--concurrency 1,8,32]

Two figures, both steadier on a shared VM than the end-to-end benchmark (bench/limits.py), both
with leases off (GW_LIMITS_LEASE_UNITS=0): every request goes through the script, as it does
near a limit:

- Redis time per request (admission + settlement) by requests per script call: `requests`
  admissions and settlements of the bench principal (three buckets, a concurrency slot, two
  budgets: the limits of bench/limits.py) go through `gateway.limits` in calls of B admissions
  (plus the settlements of the previous B); INFO commandstats gives Redis's time in FCALL (and EVALSHA, for older trees).
  Best of 3. What a call costs whatever it carries is paid once per B requests.
- Client CPU per request: C concurrent tasks on uvloop, each admitting, reading the headers and
  settling (not awaited, as the service does), pinned to core 0 when the machine has two cores;
  user + system CPU of this process per request.

Redis: REDIS_URL (its db replaced by 15), else 127.0.0.1:6379 if it answers, else an embedded one; db 15, flushed at start
and end (the lock of the other bench scripts is held: one runs at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import resource
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")
os.environ.setdefault("SECRET_KEY", "bench-limits-script")
# Every request through the script: what a request costs where leases are not granted (near a limit)
os.environ["GW_LIMITS_LEASE_UNITS"] = "0"

LOCK = Path(tempfile.gettempdir()) / "gw-bench.lock"
ROW = {"request_id": "r" * 32, "tenant_id": 1, "model": "bench", "prompt_tokens": 10, "completion_tokens": 20,
       "cost_usd": "0.0000135", "http_status": 200}


def redis_url(scratch: Path) -> tuple[str, object | None]:
    import redis

    if os.environ.get("REDIS_URL"):
        from bench._stack import redis_db_url

        return redis_db_url(os.environ["REDIS_URL"], 15), None
    try:
        redis.Redis(socket_connect_timeout=0.5).ping()
        return "redis://127.0.0.1:6379/15", None
    except redis.RedisError:
        from llm_platform.embedded import EmbeddedRedis

        store = EmbeddedRedis(scratch / "redis", persist=False)
        return store.start().rsplit("/", 1)[0] + "/15", store


def principal():
    from tenants.principal import Principal

    return Principal(key_id=1, key_prefix="gw-bench", tenant_id=1, tenant_slug="bench", tier="bench",
                     store_content=False, expires_at=None, allowed_models=(), requests_per_minute=10**7,
                     requests_per_hour=10**8, tokens_per_minute=10**9, max_concurrent=100_000,
                     daily_budget_usd="1000000", monthly_budget_usd="10000000", max_tokens_cap=None)


async def batches(who, requests: int, per_call: int) -> None:
    from billing.recorder import rider
    from gateway import limits

    pending = []
    for i in range(requests // per_call):
        prepared = [limits.prepare_admission(who, f"r{i}-{j}", 310, 5000) for j in range(per_call)]
        settles = [limits.submit(limits.settle_operation(a, 30, Decimal("0.0000135")), defer=True, rider=rider(ROW)) for a in pending]
        replies = await asyncio.gather(*(limits.submit(op) for _, op in prepared), *settles)
        pending = [limits.finish_admission(a, reply) for (a, _), reply in zip(prepared, replies, strict=False)]


async def clients(who, requests: int, concurrency: int) -> None:
    from billing.recorder import rider
    from gateway import limits

    lane = SimpleNamespace(price_input=Decimal("0.15"), price_output=Decimal("0.6"))
    settles = []

    async def worker(n: int, w: int) -> None:
        for i in range(n):
            estimate = limits.estimate_nano(lane, 10, 300)
            admission, operation = limits.prepare_admission(who, f"c{w}-{i}", 310, estimate)
            limits.finish_admission(admission, await limits.submit(operation))
            settles.append(limits.submit(limits.settle_operation(admission, 30, Decimal("0.0000135")), defer=True, rider=rider(ROW)))

    await asyncio.gather(*(worker(requests // concurrency, w) for w in range(concurrency)))
    await asyncio.gather(*settles)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per measurement (3000)")
    parser.add_argument("--batches", default="1,3,8", help="requests per script call (1,3,8)")
    parser.add_argument("--concurrency", default="1,8,32", help="client concurrencies (1,8,32)")
    args = parser.parse_args()
    lock = open(LOCK, "w")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another bench script is running (lock held); try again when it ends", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gw-limits-script-") as scratch:
        url, store = redis_url(Path(scratch))
        os.environ["REDIS_URL"] = url
        import django

        django.setup()
        import redis
        import uvloop

        client = redis.Redis.from_url(url)
        client.flushdb()
        who = principal()
        try:
            print(f"Limits without HTTP, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
                  f"Redis {client.info('server')['redis_version']} at {url.split('@')[-1]}")
            print("\nRedis time in lua/limits.lua per request (admission + settlement), best of 3 x "
                  f"{args.requests} requests")
            print(" requests per call | us of Redis per request")
            for per_call in (int(b) for b in args.batches.split(",")):
                best = float("inf")
                for _ in range(3):
                    client.config_resetstat()
                    uvloop.run(batches(who, args.requests, per_call))
                    stats = client.info("commandstats")
                    used = sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in ("evalsha", "fcall"))
                    best = min(best, used / (args.requests // per_call * per_call))
                print(f"{per_call:>18} | {best:.1f}")
            if (os.cpu_count() or 1) >= 2:
                os.sched_setaffinity(0, {0})
            print("\nClient CPU per request (prepare, submit, headers, settle), uvloop, one process")
            print(" concurrency | us CPU per request (user + system) | requests/s")
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                n = max(args.requests * 4 // concurrency, 1) * concurrency
                before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                uvloop.run(clients(who, n, concurrency))
                after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                print(f"{concurrency:>12} | {cpu / n * 1e6:.1f} | {n / wall:,.0f}")
        finally:
            client.flushdb()
            if store is not None:
                store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
