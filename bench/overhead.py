"""The platform's own overhead: the same chat request sent direct to a fast fake upstream and
through the platform, closed-loop, on one core each; prints one table and the targets.

    .venv/bin/python bench/overhead.py [--duration 5] [--concurrency 1,8,32]
                                        [--server uvicorn|daphne] [--quick]

What runs (bench/README.md has the details and the meaning of each column):
- PostgreSQL and Redis: DATABASE_URL / REDIS_URL if set, else the machine's on their default
  ports, else embedded ones started for this run. The benchmark uses its own database
  (`gw_bench`, dropped and created at start) and Redis db 12 (flushed at start and end).
- a fake OpenAI-compatible upstream (bench/fake_upstream.py: precomputed bytes, no delay,
  20 chunks per stream), the usage writer and this load generator on the second core;
- one platform process (uvicorn, or daphne) on the first core, with authentication and usage
  recording on, as in production.
Everything started here is stopped on exit, also on Ctrl-C, SIGTERM or an error; the whole run
is bounded by an alarm. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import math
import os
import platform as host_platform
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from llm_platform.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_open  # noqa: E402

PY = sys.executable
HOST = "127.0.0.1"
DB_NAME = "gw_bench"
REDIS_DB = 12
TENANT = "bench"
TIER = "bench-unlimited"
ROUTE = "bench"
UPSTREAM_MODEL = "gpt-4o-mini"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-bench-upstream-not-a-real-key"
CHUNKS = 20
REQUEST_TIMEOUT = 30.0
MESSAGES = [{"role": "user", "content": "hello benchmark"}]
TARGETS = {"rps": 400.0, "streams": 300.0, "added_p50_ms": 2.0, "rss_mib": 150.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


# -- processes ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Children get SIGTERM if this process dies without cleaning up (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Children started by this run, stopped in reverse order however the run ends."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, cmd: list[str], env: dict, cpu: int | None, stdout=None) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]  # taskset execs the command: same pid
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log.open("wb"),
            stderr=log.open("wb") if stdout is not None else subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
            preexec_fn=_die_with_parent,
        )
        self.children.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop one child now (py-spy writes its profile on SIGINT)."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.children = [c for c in self.children if c[1] is not proc]

    def check_alive(self) -> None:
        for name, proc, log in self.children:
            if name.startswith("py-spy"):
                continue
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail(log)}")

    def stop_all(self) -> None:
        for _name, proc, _log in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _name, proc, _log in reversed(self.children):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.children.clear()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def core_busy_seconds(cpu: int) -> float:
    """Busy time of one core (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK
    return 0.0


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- services -------------------------------------------------------------------------------

def with_path(url: str, path: str) -> str:
    return urlunparse(urlparse(url)._replace(path=path))


class Services:
    """PostgreSQL and Redis URLs for this run (and the embedded servers it had to start)."""

    def __init__(self, scratch: Path, force_embedded: bool) -> None:
        self.scratch = scratch
        self.force_embedded = force_embedded
        self.embedded: list = []
        self.database_url = ""
        self.redis_url = ""
        self.where: list[str] = []

    def start(self) -> None:
        base_db = None if self.force_embedded else os.environ.get("DATABASE_URL")
        if base_db:
            self.where.append("PostgreSQL from DATABASE_URL")
        elif not self.force_embedded and port_open(HOST, 5432):
            base_db = f"postgres://postgres@{HOST}:5432/postgres"
            self.where.append("PostgreSQL on 127.0.0.1:5432")
        else:
            say("starting an embedded PostgreSQL …")
            pg = EmbeddedPostgres(self.scratch / "postgres")
            self.embedded.append(pg)
            base_db = pg.start()
            self.where.append(f"embedded PostgreSQL on port {pg.port}")
        base_redis = None if self.force_embedded else os.environ.get("REDIS_URL")
        if base_redis:
            self.where.append("Redis from REDIS_URL")
        elif not self.force_embedded and port_open(HOST, 6379):
            base_redis = f"redis://{HOST}:6379/0"
            self.where.append("Redis on 127.0.0.1:6379")
        else:
            say("starting an embedded Redis (valkey) …")
            rd = EmbeddedRedis(self.scratch / "redis", persist=False)
            self.embedded.append(rd)
            base_redis = rd.start()
            self.where.append(f"embedded Redis on port {rd.port}")
        self.database_url = with_path(base_db, "/" + DB_NAME)
        self.redis_url = with_path(base_redis, f"/{REDIS_DB}")
        self._fresh_database(with_path(base_db, "/postgres"))
        self.flush_redis()

    def _fresh_database(self, admin_url: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            name = sql.Identifier(DB_NAME)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()

    def stop(self) -> None:
        for server in reversed(self.embedded):
            with contextlib.suppress(Exception):
                server.stop()
        self.embedded.clear()


# -- setup of the platform ------------------------------------------------------------------

ROUTES_YAML = """\
routes:
  - model: {route}
    description: bench/overhead.py's route to its fake upstream
    lanes:
      - provider: openai-compatible
        upstream_model: {upstream_model}
        base_url: {base_url}
        api_key_env: {key_env}
        context_window: 128000
        prices: {{input: "0.15", output: "0.60", cached_input: "0.075"}}
"""

UNLIMITED_TIER = """
from tenants.models import Tier
tier = Tier.objects.get(name={tier!r})
for name in Tier.LIMIT_NAMES:
    setattr(tier, name, None)  # blank limits are unlimited
tier.allowed_models = []
tier.save()
"""


def manage(env: dict, *args: str, timeout: float = 180) -> str:
    result = subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args[:2])} failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def wait_for_port_line(proc: subprocess.Popen, timeout: float = 20) -> int:
    """The port a child announced with a `PORT <n>` line on stdout."""
    deadline = time.monotonic() + timeout
    buffer = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            buffer += data
            for line in buffer.splitlines():
                if line.startswith(b"PORT "):
                    return int(line.split()[1])
    raise RuntimeError(f"the fake upstream did not start: {buffer.decode(errors='replace')}")


def first_request(url: str, key: str) -> float:
    """Latency (ms) of the platform's very first chat request; fails loudly if it is refused."""
    request = urllib.request.Request(url, data=request_body(ROUTE, False), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the first request through the platform failed: HTTP {exc.code} {exc.read()[:500]!r}") from None
    elapsed = (time.perf_counter() - started) * 1000
    problem = check_answer(False, payload)
    if problem:
        raise RuntimeError(f"the first request through the platform: {problem}: {payload[:500]!r}")
    return elapsed


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the platform exited ({proc.returncode}) before it was healthy:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the platform was not healthy within {timeout:.0f} s:\n{tail(log)}")


# -- load generation ------------------------------------------------------------------------

@dataclass
class Target:
    name: str  # "direct" or "platform"
    url: str
    model: str
    key: str
    pid: int | None = None  # the process whose CPU is charged to this path (platform only)


@dataclass
class Result:
    target: str
    stream: bool
    concurrency: int
    ok: int = 0  # good answers completed inside the measured window
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # ms, good answers in the window
    ttfts: list[float] = field(default_factory=list)  # ms, streams only
    sent: int = 0  # every request of the phase, warm-up included
    good: int = 0  # good answers of the phase, warm-up included
    statuses: Counter = field(default_factory=Counter)  # non-200 statuses (whole phase)
    problems: Counter = field(default_factory=Counter)  # exceptions, broken answers (whole phase)
    samples: list[str] = field(default_factory=list)  # first few bad answers, for diagnosis
    cpu: float | None = None  # CPU seconds of the target process inside the window
    core_other: float | None = None  # platform core busy time not spent by the platform

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def bad(self) -> int:
        return sum(self.statuses.values()) + sum(self.problems.values())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))  # nearest rank
    return ordered[max(0, min(len(ordered), rank) - 1)]


def request_body(model: str, stream: bool) -> bytes:
    body: dict = {"model": model, "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def check_answer(stream: bool, body: bytes) -> str | None:
    """Why a 200 answer is not a complete, well-formed one (None when it is)."""
    if stream:
        if not body.endswith(b"data: [DONE]\n\n"):
            return "stream without [DONE]"
        if body.count(b"data: ") < CHUNKS + 3:
            return "stream with missing events"
        if b'"completion_tokens"' not in body:
            return "stream without usage"
        return None
    if b'"choices"' not in body or b'"completion_tokens"' not in body:
        return "answer without choices or usage"
    return None


async def one_request(session: aiohttp.ClientSession, target: Target, body: bytes, headers: dict,
                      stream: bool, result: Result, window: list) -> None:
    started = time.perf_counter()
    ttft = None
    try:
        async with session.post(target.url, data=body, headers=headers) as response:
            if stream and response.status == 200:
                parts = []
                async for data in response.content.iter_any():
                    if ttft is None and b"data:" in (b"".join(parts) + data if parts else data):
                        ttft = time.perf_counter() - started
                    parts.append(data)
                payload = b"".join(parts)
            else:
                payload = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        result.problems[type(exc).__name__] += 1
        if len(result.samples) < 3:
            result.samples.append(f"{type(exc).__name__}: {exc}")
        return
    finished = time.perf_counter()
    if status != 200:
        result.statuses[status] += 1
        if len(result.samples) < 3:
            result.samples.append(f"HTTP {status}: {payload[:300].decode(errors='replace')}")
        return
    problem = check_answer(stream, payload)
    if problem is not None:
        result.problems[problem] += 1
        if len(result.samples) < 3:
            result.samples.append(f"{problem}: …{payload[-300:].decode(errors='replace')}")
        return
    result.good += 1
    window.append((finished, (finished - started) * 1000, None if ttft is None else ttft * 1000))


async def run_phase(target: Target, stream: bool, concurrency: int, warmup: float, duration: float,
                    platform_cpu: int | None) -> Result:
    """C workers in a closed loop for warmup + duration seconds; the window is the last part."""
    result = Result(target.name, stream, concurrency)
    body = request_body(target.model, stream)
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    window: list[tuple[float, float, float | None]] = []
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    marks: dict[str, tuple[float, float | None, float | None]] = {}

    def mark(name: str) -> None:
        proc_cpu = cpu_seconds(target.pid) if target.pid else None
        core = core_busy_seconds(platform_cpu) if platform_cpu is not None else None
        marks[name] = (time.perf_counter(), proc_cpu, core)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        start = time.perf_counter()
        stop_at = start + warmup + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                result.sent += 1
                await one_request(session, target, body, headers, stream, result, window)

        async def marker() -> None:
            await asyncio.sleep(max(0.0, start + warmup - time.perf_counter()))
            mark("begin")
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            mark("end")

        await asyncio.wait_for(
            asyncio.gather(marker(), *(worker() for _ in range(concurrency))),
            timeout=warmup + duration + REQUEST_TIMEOUT + 10,
        )
    (t0, cpu0, core0), (t1, cpu1, core1) = marks["begin"], marks["end"]
    inside = [w for w in window if t0 <= w[0] <= t1]
    result.elapsed = t1 - t0
    result.ok = len(inside)
    result.latencies = [w[1] for w in inside]
    result.ttfts = [w[2] for w in inside if w[2] is not None]
    if cpu0 is not None and cpu1 is not None:
        result.cpu = cpu1 - cpu0
        if core0 is not None and core1 is not None:
            result.core_other = max(0.0, (core1 - core0) - result.cpu)
    return result


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
        print(" | ".join(cell.rjust(width) for cell, (_, width) in zip(cells, columns)))
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


def choose_cpus() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        say(f"only {len(cpus)} CPU available: nothing is pinned, figures mix platform and load")
        return None, None
    return cpus[0], cpus[1]


def base_env(services: Services) -> dict:
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
        "SECRET_KEY": "bench-" + secrets.token_urlsafe(32),
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "LOG_LEVEL": "WARNING",
        "DEBUG": "0",
        UPSTREAM_KEY_ENV: UPSTREAM_KEY,
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.pop("CELERY_BROKER_URL", None)
    env.pop("CELERY_RESULT_BACKEND", None)
    return env


def platform_command(server: str, port: int) -> list[str]:
    if server == "daphne":
        # daphne has no ASGI lifespan: the route table loads on the first (warm-up) request.
        return [PY, "-m", "daphne", "-b", HOST, "-p", str(port), "-v", "0", "llm_platform.asgi:application"]
    return [PY, "-m", "uvicorn", "llm_platform.asgi:application", "--host", HOST, "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--lifespan", "on"]


def start_profile(procs: Processes, folder: str | None, pid: int, name: str, env: dict,
                  cpu: int | None) -> subprocess.Popen | None:
    """py-spy sampling the platform (non-blocking: it does not pause it) into folder/name.txt."""
    if folder is None:
        return None
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        say("--profile: py-spy is not installed (pip install py-spy); not profiling")
        return None
    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return procs.start(f"py-spy-{name}", [spy, "record", "--nonblocking", "--rate", "200", "--format", "raw",
                                          "--output", str(out / f"{name}.txt"), "--pid", str(pid)], env, cpu)


def drain_usage(redis_url: str, timeout: float = 30) -> tuple[int, int]:
    """Wait until the writer has emptied the usage stream; returns (left in stream, pending)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    stream = os.environ.get("GW_USAGE_STREAM") or "gw:usage"
    deadline = time.monotonic() + timeout
    try:
        while True:
            length = client.xlen(stream)
            try:
                pending = client.xpending(stream, "usage-writers")["pending"]
            except redis.ResponseError:
                pending = 0
            if (length == 0 and pending == 0) or time.monotonic() > deadline:
                return length, pending
            time.sleep(0.2)
    finally:
        client.close()


def usage_rows(database_url: str) -> tuple[int, str]:
    import psycopg

    with psycopg.connect(database_url, connect_timeout=10) as conn:
        count, cost = conn.execute("SELECT count(*), coalesce(sum(cost_usd), 0) FROM billing_usagerecord").fetchone()
    return count, f"{cost:.6f}"


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
              f"{args.duration:g} s per cell after {args.warmup:g} s warm-up; {CHUNKS}-chunk streams")
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
        if rows < served:
            print(f"WARNING: {served - rows} platform answers have no usage row")
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
        with contextlib.suppress(KeyboardInterrupt):
            procs.stop_all()
            with contextlib.suppress(Exception):
                if services.redis_url:
                    services.flush_redis()
            services.stop()
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
