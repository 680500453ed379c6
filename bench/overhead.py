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
import asyncio
import contextlib
import datetime as dt
import fcntl
import os
import platform as host_platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import CHUNKS, Result, Target, first_request, percentile, run_phase  # noqa: E402
from bench._stack import (  # noqa: E402
    DB_NAME,
    HOST,
    PY,
    REDIS_DB,
    ROOT,
    ROUTE,
    ROUTES_YAML,
    TENANT,
    TIER,
    UNLIMITED_FLAGS,
    UNLIMITED_TIER,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    UPSTREAM_MODEL,
    Processes,
    Services,
    base_env,
    choose_cpus,
    cpu_seconds,
    drain_usage,
    manage,
    platform_command,
    say,
    start_profile,
    tree_state,
    usage_rows,
    vm_hwm_mib,
    wait_for_port_line,
    wait_healthy,
)
from llm_platform.embedded import free_port  # noqa: E402

TARGETS = {"rps": 400.0, "streams": 300.0, "added_p50_ms": 2.0, "rss_mib": 150.0}
LOCK_FILE = Path(tempfile.gettempdir()) / "gw-bench-overhead.lock"


# -- report ---------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def print_table(pairs: list[tuple[Result, Result]]) -> None:
    columns = [
        ("mode", 10), ("c", 3), ("direct req/s", 12), ("platform req/s", 14), ("ratio", 6),
        ("direct p50", 10), ("direct p99", 10), ("plat p50", 9), ("plat p99", 9), ("added p50", 9),
        ("TTFT p50 dir", 12), ("TTFT p50 plat", 13), ("plat CPU ms/req", 15), ("core0 other", 11),
    ]
    header = " | ".join(name.rjust(width) for name, width in columns)
    print(header)
    print("-+-".join("-" * width for _, width in columns))
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
        print(" | ".join(cell.rjust(width) for cell, (_, width) in zip(cells, columns, strict=True)))
    print("(latencies in ms; req/s for streams = complete 20-chunk streams per second)")


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


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


def print_problems(results: list[Result]) -> int:
    bad = [r for r in results if r.bad]
    total = sum(r.sent for r in results)
    if not bad:
        print(f"\nErrors: none ({total:,} requests, every answer 200 and complete).")
        return 0
    print(f"\nErrors: {sum(r.bad for r in bad):,} of {total:,} requests failed:")
    for r in bad:
        kinds = [f"HTTP {s} x{n}" for s, n in sorted(r.statuses.items())]
        kinds += [f"{k} x{n}" for k, n in r.problems.most_common()]
        print(f"  {r.target:8s} {'stream' if r.stream else 'non-stream':10s} c={r.concurrency}: {', '.join(kinds)}")
        for sample in r.samples:
            print(f"      e.g. {sample}")
    return sum(r.bad for r in bad)


def log_problems(path: Path, name: str) -> None:
    """Warnings and errors the platform or the writer logged (LOG_LEVEL=WARNING keeps only those)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return
    noise = ("Started server process", "Waiting for application startup", "Application startup complete",
             "Uvicorn running on", "Shutting down", "Waiting for application shutdown",
             "Application shutdown complete", "Finished server process", "usage writer ")
    lines = [line for line in lines if not any(n in line for n in noise)]
    if lines:
        print(f"\n{name} logged {len(lines)} line(s) at WARNING or above; the first ones:")
        for line in lines[:5]:
            print(f"  {line[:300]}")


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

    def on_alarm(*_):
        raise TimeoutError(f"the benchmark exceeded its time bound ({budget:.0f} s)")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    signal.alarm(int(budget))

    lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"another bench/overhead.py is running (it holds {LOCK_FILE}); they would share {DB_NAME}")
        return 2
    platform_cpu, client_cpu = choose_cpus()
    scratch = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    os.chmod(scratch, 0o755)  # an embedded PostgreSQL runs as `postgres` when we are root
    (scratch / "logs").mkdir()
    procs = Processes(scratch / "logs")
    services = Services(scratch, args.embedded)
    started = time.monotonic()
    try:
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        services.start()
        env = base_env(services)
        say(f"{', '.join(services.where)}; database {DB_NAME}, Redis db {REDIS_DB}")

        upstream = procs.start("upstream", [PY, str(ROOT / "bench" / "fake_upstream.py"), "--port", "0",
                                            "--chunks", str(CHUNKS)], env, client_cpu, stdout=subprocess.PIPE)
        upstream_port = wait_for_port_line(upstream)
        upstream_root = f"http://{HOST}:{upstream_port}/v1"

        say("migrating gw_bench, loading the route, creating the tenant and its key …")
        manage(env, "migrate", "--noinput", "-v", "0")
        routes_file = scratch / "routes.yaml"
        routes_file.write_text(ROUTES_YAML.format(route=ROUTE, upstream_model=UPSTREAM_MODEL,
                                                  base_url=upstream_root, key_env=UPSTREAM_KEY_ENV))
        manage(env, "load_routes", str(routes_file))
        manage(env, "create_tenant", TENANT, "--name", "Benchmark tenant", "--tier", TIER)
        try:
            manage(env, "set_limits", TENANT, *UNLIMITED_FLAGS)
        except RuntimeError as exc:
            if "Unknown command" not in str(exc):
                raise
            manage(env, "shell", "-c", UNLIMITED_TIER.format(tier=TIER))
        key = manage(env, "issue_key", TENANT, "--name", "bench", "--quiet").strip().splitlines()[-1]

        port = free_port()
        plat = procs.start("platform", platform_command(args.server, port), env, platform_cpu)
        procs.start("usage_writer", [PY, "manage.py", "usage_writer", "--consumer", "bench-writer"], env, client_cpu)
        platform_url = f"http://{HOST}:{port}"
        wait_healthy(platform_url, plat, procs.logs / "platform.log")
        rss_ready = vm_hwm_mib(plat.pid)
        cpu_ready = cpu_seconds(plat.pid)
        say(f"{args.server} pid {plat.pid} on core {platform_cpu}, upstream + writer + load on core {client_cpu}; "
            f"healthy after {time.monotonic() - started:.1f} s, RSS {rss_ready:.0f} MiB")
        first_ms = first_request(f"{platform_url}/v1/chat/completions", key)

        direct = Target("direct", f"{upstream_root}/chat/completions", UPSTREAM_MODEL, UPSTREAM_KEY)
        through = Target("platform", f"{platform_url}/v1/chat/completions", ROUTE, key, pid=plat.pid)
        pairs: list[tuple[Result, Result]] = []
        results: list[Result] = []

        async def run_all() -> None:
            for stream in (False, True):
                for c in args.levels:
                    say(f"{'stream' if stream else 'non-stream'} c={c}: direct, then through the platform "
                        f"({args.warmup:g} s warm-up + {args.duration:g} s each)")
                    d = await run_phase(direct, stream, c, args.warmup, args.duration, None)
                    procs.check_alive()
                    spy = start_profile(procs, args.profile, plat.pid, f"{'stream' if stream else 'nonstream'}-c{c}", env, client_cpu)
                    p = await run_phase(through, stream, c, args.warmup, args.duration, platform_cpu)
                    if spy is not None:
                        procs.stop(spy, signal.SIGINT)
                    procs.check_alive()
                    pairs.append((d, p))
                    results.extend((d, p))

        try:
            import uvloop
        except ImportError:
            asyncio.run(run_all())
        else:
            uvloop.run(run_all())

        rss_peak = vm_hwm_mib(plat.pid)
        cpu_total = cpu_seconds(plat.pid) - cpu_ready
        served = 1 + sum(r.good for r in results if r.target == "platform")  # 1: the first request
        in_windows = [r for r in results if r.target == "platform" and r.cpu is not None]
        window_cpu = sum(r.cpu for r in in_windows)
        window_ok = sum(r.ok for r in in_windows)
        left, pending = drain_usage(services.redis_url)
        rows, cost = usage_rows(services.database_url)
        writer = next(p for n, p, _ in procs.children if n == "usage_writer")
        writer_cpu = cpu_seconds(writer.pid)

        print()
        print(f"Platform overhead, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {host_platform.node()}, "
              f"{os.cpu_count()} cores, Python {host_platform.python_version()}, server {args.server}; "
              f"{args.duration:g} s per cell after {args.warmup:g} s warm-up; {CHUNKS}-chunk streams; {tree_state()}")
        print()
        print_table(pairs)
        print()
        print(f"Platform process ({args.server}, pid {plat.pid}): peak RSS (VmHWM) {rss_peak:.1f} MiB "
              f"(at ready {rss_ready:.1f} MiB); CPU {window_cpu:.2f} s for {window_ok:,} answers in the measured "
              f"windows = {window_cpu * 1000 / max(window_ok, 1):.2f} ms/request "
              f"(since ready, warm-ups included: {cpu_total:.2f} s / {served:,} = {cpu_total * 1000 / max(served, 1):.2f} ms/request); "
              f"first request after start {first_ms:.1f} ms")
        print(f"Usage recording: {rows:,} rows in {DB_NAME}.billing_usagerecord for {served:,} good platform "
              f"answers, total cost ${cost}; {left} left in the stream, {pending} pending; "
              f"usage writer CPU {writer_cpu:.2f} s (start-up included) = {writer_cpu * 1000 / max(rows, 1):.2f} ms/row")
        print_targets(pairs, rss_peak)
        bad = print_problems(results)
        busy = [p.core_other / p.elapsed for _, p in pairs if p.core_other is not None and p.elapsed]
        if busy and max(busy) > 0.15:
            print(f"\nWARNING: other processes used up to {max(busy):.0%} of the platform's core during the "
                  f"measured windows (column core0 other): the platform's req/s and latencies are lower than "
                  f"on a quiet machine; its CPU ms/request is the figure least affected.")
        if rows < served:
            print(f"WARNING: {served - rows} platform answers have no usage row")
        elif rows > served:
            print(f"WARNING: {rows - served} more usage rows than platform answers: something else wrote "
                  f"to Redis db {REDIS_DB}'s usage stream during the run")
        gw_vars = sorted(k for k in os.environ if k.startswith("GW_"))
        if gw_vars:
            print(f"\nNote: GW_* settings inherited from the environment: {', '.join(gw_vars)}")
        log_problems(procs.logs / "platform.log", "The platform")
        log_problems(procs.logs / "usage_writer.log", "The usage writer")
        return 1 if bad else 0
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        procs.stop_all()
        with contextlib.suppress(Exception):
            if services.redis_url:
                services.flush_redis()
        services.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
