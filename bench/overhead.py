"""The platform's own overhead: the same chat request sent direct to a fast fake upstream and
through the platform, closed-loop, on one core each; prints one table and the targets.

    .venv/bin/python bench/overhead.py [--duration 5] [--concurrency 1,8,32]
                                        [--server uvicorn|daphne] [--quick]

What runs (bench/README.md has the details and the meaning of each column):
- PostgreSQL and Redis: DATABASE_URL / REDIS_URL if set, else the machine's on their default
  ports, else embedded ones started for this run. The benchmark uses its own database
  (`gw_bench`, dropped and created at start) and Redis db 15 (flushed at start and end).
- a fake OpenAI-compatible upstream (bench/fake_upstream.py: precomputed bytes, no delay,
  20 chunks per stream), the usage writer and this load generator on the second core;
- one platform process (uvicorn, or daphne) on the first core, with authentication and usage
  recording on, as in production.
Everything started here is stopped on exit, also on Ctrl-C, SIGTERM or an error; the whole run
is bounded by an alarm. Only loopback addresses are used. bench/_stack.py starts the stack,
bench/_load.py sends the load.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import Bench, run_bench  # noqa: E402
from bench._load import CHUNKS, Result, Target, first_request, percentile, run_phase  # noqa: E402
from bench._report import (  # noqa: E402
    fmt,
    gw_note,
    header,
    log_problems,
    print_problems,
    table,
    verdict,
    warn_busy,
)
from bench._stack import (  # noqa: E402
    DB_NAME,
    REDIS_DB,
    ROUTE,
    ROUTES_YAML,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    UPSTREAM_MODEL,
    cpu_seconds,
    say,
    start_profile,
    vm_hwm_mib,
)

TARGETS = {"rps": 400.0, "streams": 300.0, "added_p50_ms": 2.0, "rss_mib": 150.0}


# -- report ---------------------------------------------------------------------------------

def print_table(pairs: list[tuple[Result, Result]]) -> None:
    columns = [
        ("mode", 10), ("c", 3), ("direct req/s", 12), ("platform req/s", 14), ("ratio", 6),
        ("direct p50", 10), ("direct p99", 10), ("plat p50", 9), ("plat p99", 9), ("added p50", 9),
        ("TTFT p50 dir", 12), ("TTFT p50 plat", 13), ("plat CPU ms/req", 15), ("core0 other", 11),
    ]
    rows = []
    for direct, plat in pairs:
        added = percentile(plat.latencies, 50) - percentile(direct.latencies, 50)
        cells = [
            "stream" if plat.stream else "non-stream", str(plat.concurrency),
            fmt(direct.rps, 0), fmt(plat.rps, 0),
            fmt(plat.rps / direct.rps, 2) if direct.rps else "-",
            fmt(percentile(direct.latencies, 50), 2), fmt(percentile(direct.latencies, 99), 2),
            fmt(percentile(plat.latencies, 50), 2), fmt(percentile(plat.latencies, 99), 2),
            fmt(added, 2),
            fmt(percentile(direct.ttfts, 50), 2) if plat.stream else "-",
            fmt(percentile(plat.ttfts, 50), 2) if plat.stream else "-",
            fmt(plat.cpu * 1000 / plat.ok, 2) if plat.cpu is not None and plat.ok else "-",
            f"{plat.core_other / plat.elapsed:.0%}" if plat.core_other is not None and plat.elapsed else "-",
        ]
        rows.append(cells)
    table(columns, rows)
    print("(latencies in ms; req/s for streams = complete 20-chunk streams per second)")


def print_targets(pairs: list[tuple[Result, Result]], rss: float) -> None:
    def best(stream: bool) -> Result | None:
        candidates = [p for _, p in pairs if p.stream == stream]
        return max(candidates, key=lambda r: r.rps) if candidates else None

    def added_at_c1(stream: bool) -> float | None:
        for d, p in pairs:
            if p.stream == stream and p.concurrency == 1:
                return percentile(p.latencies, 50) - percentile(d.latencies, 50)
        return None

    print("\nTargets (platform on one core):")
    non_stream, streams = best(False), best(True)
    def cpu_bound(r: Result) -> str:
        if r.cpu is None or not r.ok or r.cpu <= 0:
            return ""
        return f"; {r.ok / r.cpu:,.0f}/s if it had the core to itself (1000 / {r.cpu * 1000 / r.ok:.2f} ms CPU)"

    if non_stream:
        print(f"  {verdict(non_stream.rps >= TARGETS['rps'])}  non-streaming req/s >= {TARGETS['rps']:.0f}: "
              f"{non_stream.rps:,.0f} (best, at c={non_stream.concurrency}){cpu_bound(non_stream)}")
    if streams:
        print(f"  {verdict(streams.rps >= TARGETS['streams'])}  streams/s >= {TARGETS['streams']:.0f}: "
              f"{streams.rps:,.0f} (best, at c={streams.concurrency}){cpu_bound(streams)}")
    added = added_at_c1(False)
    print(f"  {verdict(None if added is None or added != added else added <= TARGETS['added_p50_ms'])}  "
          f"added p50 at c=1 <= {TARGETS['added_p50_ms']:.0f} ms: "
          + ("c=1 not run" if added is None else f"{added:.2f} ms non-stream")
          + ("" if added_at_c1(True) is None else f" ({added_at_c1(True):.2f} ms stream, for information)"))
    print(f"  {verdict(rss <= TARGETS['rss_mib'])}  peak RSS <= {TARGETS['rss_mib']:.0f} MiB: {rss:.1f} MiB")


# -- the run --------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the platform's own overhead (bench/README.md).")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 1, 0.3 with --quick)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrencies (default 1,8,32)")
    parser.add_argument("--server", choices=("uvicorn", "daphne"), default="uvicorn")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per cell, c=1,8")
    parser.add_argument("--embedded", action="store_true", help="use embedded PostgreSQL/Redis even if others answer")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="record the platform with py-spy (if installed) during each platform cell, as "
                             "collapsed stacks in DIR (figures are then slightly lower)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency = 1.0, "1,8"
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,8,32")
    if not args.levels or min(args.levels) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("need concurrency >= 1, duration > 0, warmup >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cells = len(args.levels) * 2 * 2
    budget = 300 + cells * (args.warmup + args.duration + 15)
    return run_bench(budget, args.embedded, measure, args)


def measure(bench: Bench, args: argparse.Namespace) -> int:
    upstream_root = bench.start_upstream()
    key = bench.prepare(ROUTES_YAML.format(route=ROUTE, upstream_model=UPSTREAM_MODEL,
                                           base_url=upstream_root, key_env=UPSTREAM_KEY_ENV))
    plat = bench.start_platform(server=args.server)
    bench.start_writer()
    say(f"{args.server} pid {plat.pid} on core {bench.platform_cpu}, upstream + writer + load on core "
        f"{bench.client_cpu}; healthy after {bench.elapsed():.1f} s, RSS {plat.rss_ready:.0f} MiB")
    first_ms = first_request(plat.chat_url, key)[0]

    direct = Target("direct", f"{upstream_root}/chat/completions", UPSTREAM_MODEL, UPSTREAM_KEY)
    through = Target("platform", plat.chat_url, ROUTE, key, pid=plat.pid)
    pairs: list[tuple[Result, Result]] = []
    results: list[Result] = []

    async def run_all() -> None:
        for stream in (False, True):
            for c in args.levels:
                say(f"{'stream' if stream else 'non-stream'} c={c}: direct, then through the platform "
                    f"({args.warmup:g} s warm-up + {args.duration:g} s each)")
                d = await run_phase(direct, stream, c, args.warmup, args.duration, None)
                bench.check_alive()
                spy = start_profile(bench.procs, args.profile, plat.pid,
                                    f"{'stream' if stream else 'nonstream'}-c{c}", bench.env, bench.client_cpu)
                p = await run_phase(through, stream, c, args.warmup, args.duration, bench.platform_cpu)
                if spy is not None:
                    bench.procs.stop(spy, signal.SIGINT)
                bench.check_alive()
                pairs.append((d, p))
                results.extend((d, p))

    bench.run(run_all)

    rss_peak = vm_hwm_mib(plat.pid)
    cpu_total = cpu_seconds(plat.pid) - plat.cpu_ready
    served = 1 + sum(r.good for r in results if r.target == "platform")  # 1: the first request
    in_windows = [r for r in results if r.target == "platform" and r.cpu is not None]
    window_cpu = sum(r.cpu for r in in_windows)
    window_ok = sum(r.ok for r in in_windows)
    left, pending, rows, cost = bench.usage()
    writer_cpu = cpu_seconds(bench.writer.pid)

    header("Platform overhead", f"server {args.server}; {args.duration:g} s per cell after {args.warmup:g} s "
                                f"warm-up; {CHUNKS}-chunk streams")
    print_table(pairs)
    print()
    print(f"Platform process ({args.server}, pid {plat.pid}): peak RSS (VmHWM) {rss_peak:.1f} MiB "
          f"(at ready {plat.rss_ready:.1f} MiB); CPU {window_cpu:.2f} s for {window_ok:,} answers in the measured "
          f"windows = {window_cpu * 1000 / max(window_ok, 1):.2f} ms/request "
          f"(since ready, warm-ups included: {cpu_total:.2f} s / {served:,} = {cpu_total * 1000 / max(served, 1):.2f} ms/request); "
          f"first request after start {first_ms:.1f} ms")
    print(f"Usage recording: {rows:,} rows in {DB_NAME}.billing_usagerecord for {served:,} good platform "
          f"answers, total cost ${cost}; {left} left in the stream, {pending} pending; "
          f"usage writer CPU {writer_cpu:.2f} s (start-up included) = {writer_cpu * 1000 / max(rows, 1):.2f} ms/row")
    print_targets(pairs, rss_peak)
    bad = print_problems(results, label=lambda r: f"{r.target:8s}")
    warn_busy([p for _, p in pairs])
    if rows < served:
        print(f"WARNING: {served - rows} platform answers have no usage row")
        bad = True
    elif rows > served:
        print(f"WARNING: {rows - served} more usage rows than platform answers: something else wrote "
              f"to Redis db {REDIS_DB}'s usage stream during the run")
    gw_note()
    log_problems(bench.platform_logs, "The platform")
    log_problems([bench.logs / "usage_writer.log"], "The usage writer")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
