"""1,000 concurrent streams on one platform process for a minute: how many fail (target: none).

    .venv/bin/python bench/streams_1000.py [--streams 1000] [--duration 60] [--pace 4]
                                           [--before /path/to/other/checkout]

Every stream is the built-in `local` model at `--pace` tokens per second (~4 s a stream at 4),
all sent with one key: `--streams` clients start together and each sends its next stream when
the previous one ends, so the streams arrive in waves, as a fleet of agents restarted together
does. The per-process key cache (GW_LOCAL_CACHE_SECONDS, 3 s by default) expires under that
load every few seconds: before its single flight, every request of a wave read the key from
Redis at once, and past the pool's 512 connections they got 503 `auth_unavailable`.

Each answer is checked (200, `[DONE]` at the end, a usage event); anything else is an error,
counted by status and error code. `--before DIR` runs the same load against a platform process
started from another checkout (e.g. the previous commit) after this one's, for comparison.

The stack is bench/overhead.py's: platform on core 0, load on core 1; database gw_bench, Redis
db 15; loopback only. Everything started is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import SIDE_TREE, Bench, run_bench  # noqa: E402
from bench._load import percentile  # noqa: E402
from bench._stack import cpu_seconds, say, tree_state, vm_hwm_mib  # noqa: E402

MODEL = "paced"
ROUTES_YAML = """\
routes:
  - model: {model}
    description: bench/streams_1000.py's paced built-in model
    lanes:
      - provider: local
        upstream_model: local
        context_window: 32768
        options: {{tokens_per_second: {pace}}}
"""
BODY = (b'{"model": "paced", "stream": true, "stream_options": {"include_usage": true}, '
        b'"messages": [{"role": "user", "content": "hello benchmark"}]}')


async def hold_streams(url: str, key: str, streams: int, duration: float) -> dict:
    import aiohttp
    import orjson

    errors: Counter = Counter()
    samples: list[str] = []
    times: list[float] = []
    ttfts: list[float] = []
    open_now = peak = 0
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    deadline = time.monotonic() + duration

    def error(kind: str, sample: str) -> None:
        errors[kind] += 1
        if len(samples) < 5:
            samples.append(sample[:300])

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal open_now, peak
        while time.monotonic() < deadline:
            started = time.perf_counter()
            open_now += 1
            peak = max(peak, open_now)
            try:
                async with session.post(url, data=BODY, headers=headers) as response:
                    if response.status != 200:
                        payload = await response.read()
                        try:
                            code = orjson.loads(payload)["error"]["code"]
                        except Exception:  # noqa: BLE001 - not our JSON: count it as such
                            code = "?"
                        error(f"HTTP {response.status} {code}", payload.decode(errors="replace"))
                        continue
                    first, parts = None, []
                    async for data in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - started
                        parts.append(data)
                    body = b"".join(parts)
                    if not body.endswith(b"data: [DONE]\n\n") or b'"completion_tokens"' not in body:
                        error("incomplete stream", body[-300:].decode(errors="replace"))
                        continue
                    times.append(time.perf_counter() - started)
                    ttfts.append(first or 0.0)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
            finally:
                open_now -= 1

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(streams)))
        elapsed = time.monotonic() - started
    return {"ok": len(times), "errors": errors, "samples": samples, "elapsed": elapsed, "peak": peak,
            "p50": percentile(times, 50), "p99": percentile(times, 99),
            "ttft_p99": percentile(ttfts, 99)}


def measure(bench: Bench, args) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.streams + 1024)), hard))
    key = bench.prepare(ROUTES_YAML.format(model=MODEL, pace=args.pace))
    sides = [("this tree", {})]
    if args.before:
        sides.append((f"before ({args.before})", {SIDE_TREE: args.before}))
    rows = []
    for label, extra in sides:
        plat = bench.start_platform(extra, label="streams", key=key, model=MODEL)
        cpu0 = cpu_seconds(plat.pid)
        say(f"{label}: {args.streams} streams for {args.duration:.0f} s …")
        out = bench.run(lambda: hold_streams(plat.chat_url, key, args.streams, args.duration))  # noqa: B023
        out["cpu"] = cpu_seconds(plat.pid) - cpu0
        out["rss"] = vm_hwm_mib(plat.pid)
        bench.stop_platform(plat)
        rows.append((label, out))
    print()
    print(f"streams_1000: {args.streams} concurrent streams of `local` at {args.pace} tokens/s, "
          f"{args.duration:.0f} s, one platform process ({tree_state()})")
    print(f"{'platform':<34} {'streams ok':>10} {'errors':>7} {'peak open':>9} {'p50 s':>6} "
          f"{'p99 s':>6} {'TTFT p99 s':>10} {'CPU s':>6} {'RSS MiB':>8}")
    for label, out in rows:
        print(f"{label:<34} {out['ok']:>10} {sum(out['errors'].values()):>7} {out['peak']:>9} "
              f"{out['p50']:>6.2f} {out['p99']:>6.2f} {out['ttft_p99']:>10.2f} {out['cpu']:>6.1f} "
              f"{out['rss']:>8.0f}")
    for label, out in rows:
        for kind, count in out["errors"].most_common():
            print(f"  {label}: {count} × {kind}")
        for sample in out["samples"][:3]:
            print(f"  {label} sample: {sample}")
    failed = sum(rows[0][1]["errors"].values())
    print(f"{'PASS' if failed == 0 else 'FAIL'}: {failed} errors on this tree (target 0)")
    return 0 if failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--pace", type=float, default=4.0, help="tokens per second of each stream")
    parser.add_argument("--before", help="another checkout whose platform gets the same load after this one's")
    parser.add_argument("--embedded", action="store_true", help="embedded PostgreSQL and Redis")
    args = parser.parse_args()
    budget = 300 + args.duration * (2 if args.before else 1) * 1.5
    return run_bench(budget, args.embedded, measure, args)


if __name__ == "__main__":
    sys.exit(main())
