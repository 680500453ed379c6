"""One benchmark run's life cycle, shared by overhead.py, limits.py and resilience.py.

`Bench` holds the run lock, bounds the run with an alarm, turns SIGTERM/SIGHUP into Ctrl-C,
starts the services (bench/_stack.py) and whatever children the script asks for, and on leaving
its `with` block, however it is left, stops every child, flushes Redis db 15, stops embedded
servers and removes its temporary folder.

    with Bench(budget_s, args.embedded) as bench:
        upstream = bench.start_upstream()
        key = bench.prepare(routes_yaml, limit_flags)
        plats = bench.start_sides({"on": {...}, "off": {...}}, round_, "limits", key)
        ...  # run_interleaved over both
        bench.stop_platform(plats["on"]); bench.stop_platform(plats["off"])
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from bench import _load
from bench._load import CHUNKS, first_request
from bench._stack import (
    DB_NAME,
    HOST,
    PY,
    REDIS_DB,
    ROOT,
    TENANT,
    TIER,
    UNLIMITED_FLAGS,
    UNLIMITED_TIER,
    Busy,
    Processes,
    Services,
    base_env,
    checkout,
    choose_cpus,
    cpu_seconds,
    drain_usage,
    imported_from,
    manage,
    pids_named,
    platform_command,
    say,
    start_profile,
    usage_rows,
    vm_hwm_mib,
    wait_for_port_line,
    wait_healthy,
)
from llm_platform.embedded import free_port

# One lock for every script here: they all use the database gw_bench and Redis db 15. The second
# is the one bench/overhead.py took before these scripts shared it (older checkouts still do).
LOCK_FILES = (Path(tempfile.gettempdir()) / "gw-bench.lock", Path(tempfile.gettempdir()) / "gw-bench-overhead.lock")


SIDE_TREE = "_TREE"  # in a side's settings: the checkout its platform process runs from (default: this one)


@dataclass
class Platform:
    """One running platform process."""

    proc: subprocess.Popen
    label: str
    url: str
    log: Path
    rss_ready: float  # MiB when it became healthy
    cpu_ready: float  # CPU seconds it had used by then
    start_s: float  # from spawn to healthy
    first_ms: float = float("nan")  # its first chat request

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"


class Bench:
    def __init__(self, budget_s: float, embedded: bool = False) -> None:
        self.budget_s = budget_s
        self.embedded = embedded
        self.started = time.monotonic()
        self.platform_cpu: int | None = None
        self.client_cpu: int | None = None
        self.platform_logs: list[Path] = []
        self.writer: subprocess.Popen | None = None
        self.writer_logs: list[Path] = []
        self._streams: list[str] = []  # Redis URLs of the usage streams the writers drain
        self.quiet_wait_s = 0.0  # spent waiting for the usage writer between cells
        self._locks: list = []
        self._scratch: Path | None = None
        self.procs: Processes | None = None
        self.services: Services | None = None
        self.env: dict = {}
        self._redis_client = None
        self.roles: dict[int, str] = {os.getpid(): "load generator"}  # pid -> role, for process_cpu
        self._postgres: tuple[float, list[int]] = (-1e9, [])

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Bench:
        def on_alarm(*_):
            raise TimeoutError(f"the benchmark exceeded its time bound ({self.budget_s:.0f} s)")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.default_int_handler)
        signal.alarm(int(self.budget_s))
        try:
            for path in LOCK_FILES:
                lock = open(path, "w")  # noqa: SIM115 - held for the whole run
                self._locks.append(lock)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise Busy(f"another benchmark is running (it holds {path}); they would share "
                               f"{DB_NAME} and Redis db {REDIS_DB}") from None
            self.platform_cpu, self.client_cpu = choose_cpus()
            self._scratch = Path(tempfile.mkdtemp(prefix="gw-bench-"))
            os.chmod(self._scratch, 0o755)  # an embedded PostgreSQL runs as `postgres` when we are root
            (self._scratch / "logs").mkdir()
            self.procs = Processes(self._scratch / "logs")
            self.services = Services(self._scratch, self.embedded)
            if self.client_cpu is not None:
                os.sched_setaffinity(0, {self.client_cpu})
            self.services.start()
            self.env = base_env(self.services)
            _load.redis_cpu_seconds = self.redis_cpu_seconds
            _load.client_core = self.client_cpu
            _load.process_cpu = self.process_cpu
            say(f"{', '.join(self.services.where)}; database {DB_NAME}, Redis db {REDIS_DB}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        try:
            if self.procs is not None:
                self.procs.stop_all()
            if self.services is not None:
                with contextlib.suppress(Exception):
                    self.services.release_redis()
                self.services.stop()
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
        finally:
            for lock in self._locks:
                lock.close()
            self._locks.clear()
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def logs(self) -> Path:
        return self.procs.logs

    # -- children ---------------------------------------------------------------------------

    def start_upstream(self) -> str:
        """The fake upstream on the client core; returns its base URL (…/v1)."""
        upstream = self.procs.start("upstream", [PY, str(ROOT / "bench" / "fake_upstream.py"), "--port", "0",
                                                 "--chunks", str(CHUNKS)], self.env, self.client_cpu,
                                    stdout=subprocess.PIPE)
        self.roles[upstream.pid] = "fake upstream"
        return f"http://{HOST}:{wait_for_port_line(upstream)}/v1"

    def prepare(self, routes_yaml: str, limit_flags: tuple[str, ...] = UNLIMITED_FLAGS, side: dict | None = None) -> str:
        """Migrate gw_bench, load the routes, create the tenant with these limits; its key. With
        `side` (from `side_services`), the same in that side's database with its checkout's code."""
        env = {**self.env, **(side or {})}
        tree = env.pop(SIDE_TREE, None)
        database = urlparse(env["DATABASE_URL"]).path.strip("/")
        say(f"migrating {database}{f' with {tree}' if tree else ''}, loading the routes, creating the tenant "
            f"and its key …")
        manage(env, "migrate", "--noinput", "-v", "0", tree=tree)
        routes_file = self._scratch / f"routes-{database}.yaml"
        routes_file.write_text(routes_yaml)
        manage(env, "load_routes", str(routes_file), tree=tree)
        manage(env, "create_tenant", TENANT, "--name", "Benchmark tenant", "--tier", TIER, tree=tree)
        try:
            manage(env, "set_limits", TENANT, *limit_flags, tree=tree)
        except RuntimeError as exc:
            if "Unknown command" not in str(exc) or limit_flags is not UNLIMITED_FLAGS:
                raise
            manage(env, "shell", "-c", UNLIMITED_TIER.format(tier=TIER), tree=tree)
        return manage(env, "issue_key", TENANT, "--name", "bench", "--quiet", tree=tree).strip().splitlines()[-1]

    def start_writer(self, side: dict | None = None, label: str = "") -> subprocess.Popen:
        """The usage writer (of `side`'s checkout, on its Redis database, with `side`); the first
        one started is `self.writer`."""
        env = {**self.env, **(side or {})}
        tree = env.pop(SIDE_TREE, None)
        name = f"usage_writer{'-' + label if label else ''}"
        writer = self.procs.start(name, [PY, "manage.py", "usage_writer", "--consumer", "bench-writer"],
                                  env, self.client_cpu, cwd=tree)
        self.roles[writer.pid] = "usage writer"
        self.writer = self.writer or writer
        self.writer_logs.append(self.logs / f"{name}.log")
        self._streams.append(env["REDIS_URL"])
        return writer

    def checkout(self, ref: str) -> tuple[Path, str]:
        """Commit `ref`'s files in the run's temporary folder (removed with it, however the run
        ends); (the folder, the full hash). Fails if the platform would not be imported from it."""
        tree = self._scratch / "baseline"
        commit = checkout(ref, tree)
        found = imported_from(tree, self.env)
        if found != tree.resolve():
            raise RuntimeError(f"a process started in {tree} imports the platform from {found}, not from the "
                               f"checkout (PYTHONPATH or an installed copy?)")
        return tree, commit

    def side_services(self, tree: Path, own_database: str | None) -> dict:
        """Settings of a platform side that runs the code in `tree`: its own Redis database
        (another code's keys, scripts and usage stream never meet this tree's), and with
        `own_database` its own PostgreSQL database (for a different schema)."""
        db = self.services.claim_redis(list(range(REDIS_DB - 1, 0, -1)))
        if db is None:
            raise Busy("no free Redis database for the baseline: test runs claim every one")
        side = {SIDE_TREE: str(tree), "REDIS_URL": self.services.redis_db(db)}
        if own_database:
            side["DATABASE_URL"] = self.services.fresh_database(own_database)
        return side

    def start_platform(self, extra_env: dict | None = None, label: str = "platform", server: str = "uvicorn",
                       key: str | None = None, model: str | None = None) -> Platform:
        """A platform process on the platform core, healthy; with `key`, its first chat request sent."""
        env = {**self.env, **(extra_env or {})}
        cwd = env.pop(SIDE_TREE, None)
        port = free_port()
        name = label if label == "platform" else f"platform-{label}-{len(self.platform_logs) + 1}"
        spawned = time.monotonic()
        proc = self.procs.start(name, platform_command(server, port), env, self.platform_cpu, cwd=cwd)
        log = self.procs.logs / f"{name}.log"
        self.platform_logs.append(log)
        url = f"http://{HOST}:{port}"
        wait_healthy(url, proc, log)
        self.roles[proc.pid] = _load.PLATFORM_ROLE
        plat = Platform(proc, label, url, log, vm_hwm_mib(proc.pid), cpu_seconds(proc.pid),
                        time.monotonic() - spawned)
        if key is not None:
            plat.first_ms = first_request(plat.chat_url, key, **({"model": model} if model else {}))[0]
        return plat

    def stop_platform(self, plat: Platform) -> None:
        self.roles.pop(plat.pid, None)
        self.procs.stop(plat.proc)

    def start_sides(self, sides: dict[str, dict], round_: int, prefix: str, key: str | None,
                    model: str | None = None) -> dict[str, Platform]:
        """A fresh platform process per side (its GW_* settings), both up at once; which starts
        first alternates by round. With `key`, each has served one request when this returns."""
        names = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        plats = {name: self.start_platform(sides[name], label=f"{prefix}-{name}", key=key, model=model)
                 for name in names}
        return {name: plats[name] for name in sides}

    def check_alive(self) -> None:
        self.procs.check_alive()

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def run(coroutine_fn):
        """Run an async function on uvloop (asyncio's loop if uvloop is missing)."""
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coroutine_fn())
        return uvloop.run(coroutine_fn())

    def usage(self, side: dict | None = None) -> tuple[int, int, int, str]:
        """After the load: (left in the stream, pending, rows written, their total cost), of
        `side`'s stream and database when given."""
        env = {**self.env, **(side or {})}
        left, pending = drain_usage(env["REDIS_URL"])
        rows, cost = usage_rows(env["DATABASE_URL"])
        return left, pending, rows, cost

    def quiet(self, timeout: float = 20) -> None:
        """Wait until the usage writer has caught up with the rows of the previous cell (it shares
        the load generator's core and lags at high rates), so that no cell inherits another's
        backlog: the sides of a comparison start alike."""
        started = time.monotonic()
        for url in self._streams or [self.services.redis_url]:
            drain_usage(url, timeout=timeout, poll=0.05)
        self.quiet_wait_s += time.monotonic() - started

    def profile(self, folder: str | None, plat: Platform, name: str) -> subprocess.Popen | None:
        """py-spy on a platform process (--profile DIR), into DIR/name.txt; stop with end_profile."""
        return start_profile(self.procs, folder, plat.pid, name, self.env, self.client_cpu)

    def end_profile(self, spy: subprocess.Popen | None) -> None:
        if spy is not None:
            self.procs.stop(spy, signal.SIGINT)

    def redis(self):
        import redis

        return redis.Redis.from_url(self.services.redis_url, socket_timeout=5)

    def redis_cpu_seconds(self) -> float | None:
        """Redis's CPU seconds so far (user + system, all its threads), from INFO cpu."""
        if self._redis_client is None:
            self._redis_client = self.redis()
        try:
            info = self._redis_client.info("cpu")
        except Exception:  # noqa: BLE001 - a figure for the report, never a reason to stop
            return None
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def process_cpu(self) -> dict[int, tuple[str, float]]:
        """{pid: (role, CPU seconds so far)}: the load generator, fake upstream, usage writer,
        platform processes and every local PostgreSQL process (listed again every 2 s: backends
        come and go). Redis is measured apart, from INFO (it may not be local)."""
        now = time.monotonic()
        if now - self._postgres[0] > 2:
            self._postgres = (now, pids_named("postgres"))
        out = {}
        for pid, role in [*self.roles.items(), *((pid, "PostgreSQL") for pid in self._postgres[1])]:
            try:
                out[pid] = (role, cpu_seconds(pid))
            except OSError:  # it ended
                continue
        return out

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def run_bench(budget: float, embedded: bool, measure, args) -> int:
    """Run `measure(bench, args)` inside a Bench; exit 2 when another run holds the lock, 130 on Ctrl-C."""
    try:
        with Bench(budget, embedded) as bench:
            return measure(bench, args)
    except Busy as exc:
        say(str(exc))
        return 2
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        return 130
