"""The stack bench/overhead.py measures: services, child processes, set-up, /proc probes.

Everything here is started by the benchmark and stopped by it (`Processes.stop_all`,
`Services.stop`); nothing touches the database or Redis index of a test or a dev run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llm_platform.embedded import EmbeddedPostgres, EmbeddedRedis, port_open  # noqa: E402
from llm_platform.testrun import CLAIM_KEY, pid_alive  # noqa: E402  (claims shared with test runs)

PY = sys.executable
HOST = "127.0.0.1"
DB_NAME = "gw_bench"
REDIS_DB = 15  # claimed like a test run's (CLAIM_KEY), so that test runs skip it
CLAIM_SECONDS = 3 * 3600
TENANT = "bench"
TIER = "bench-unlimited"
ROUTE = "bench"
UPSTREAM_MODEL = "gpt-4o-mini"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-bench-upstream-not-a-real-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


class Busy(RuntimeError):
    """Another run holds what this one needs (the bench lock, the bench's Redis database)."""


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

    def start(self, name: str, cmd: list[str], env: dict, cpu: int | None, stdout=None, cwd=None) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]  # taskset execs the command: same pid
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=cwd or ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else out,
                stderr=out if stdout is not None else subprocess.STDOUT,
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


def pids_named(name: str) -> list[int]:
    """Processes whose command name (/proc/<pid>/comm) is `name`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == name:
                    found.append(int(entry))
        except OSError:
            continue
    return found


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


def redis_db_url(url: str, db: int) -> str:
    """`url` naming database `db`: the path of redis://, the `db` query of unix:// (whose
    path is the socket's)."""
    parts = urlparse(url)
    if parts.scheme == "unix":
        query = "&".join([q for q in parts.query.split("&") if q and not q.startswith("db=")] + [f"db={db}"])
        return f"unix://{parts.netloc}{parts.path}?{query}"
    return with_path(url, f"/{db}")


class Services:
    """PostgreSQL and Redis URLs for this run (and the embedded servers it had to start)."""

    def __init__(self, scratch: Path, force_embedded: bool) -> None:
        self.scratch = scratch
        self.force_embedded = force_embedded
        self.embedded: list = []
        self.database_url = ""
        self.redis_url = ""
        self.where: list[str] = []
        self._base_db = ""
        self._base_redis = ""
        self.claimed: list[int] = []  # Redis databases this run claimed, released (flushed) by release_redis

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
        self._base_db, self._base_redis = base_db, base_redis
        if self.claim_redis([REDIS_DB]) is None:
            raise Busy(f"Redis db {REDIS_DB} is claimed by a running test run ({CLAIM_KEY % REDIS_DB} in db 0)")
        self.database_url = self.fresh_database(DB_NAME)
        self.redis_url = redis_db_url(base_redis, REDIS_DB)
        self.flush_redis()

    def fresh_database(self, name: str) -> str:
        """Drop and create database `name` on the run's PostgreSQL; its URL (left in place at the end)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(with_path(self._base_db, "/postgres"), autocommit=True, connect_timeout=10) as conn:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        return with_path(self._base_db, "/" + name)

    def claim_redis(self, candidates: list[int]) -> int | None:
        """The first of `candidates` this run can claim the way test runs do (SET NX in db 0, so
        that they skip it), flushed; a claim left by a process that is gone is taken over."""
        import redis

        control = redis.Redis.from_url(redis_db_url(self._base_redis, 0), socket_timeout=5)
        try:
            for db in candidates:
                key = CLAIM_KEY % db
                if not control.set(key, os.getpid(), nx=True, ex=CLAIM_SECONDS):
                    holder = control.get(key) or b""
                    if not holder.isdigit() or pid_alive(int(holder)):
                        continue
                    control.set(key, os.getpid(), ex=CLAIM_SECONDS)  # its run died before its clean-up
                self.claimed.append(db)
                redis.Redis.from_url(redis_db_url(self._base_redis, db), socket_timeout=5).flushdb()
                return db
        finally:
            control.close()
        return None

    def redis_db(self, db: int) -> str:
        return redis_db_url(self._base_redis, db)

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()

    def release_redis(self) -> None:
        """Flush every database this run claimed and give up its claims."""
        import redis

        control = redis.Redis.from_url(redis_db_url(self._base_redis, 0), socket_timeout=5)
        try:
            for db in self.claimed:
                with contextlib.suppress(Exception):
                    redis.Redis.from_url(redis_db_url(self._base_redis, db), socket_timeout=5).flushdb()
                    if control.get(CLAIM_KEY % db) == str(os.getpid()).encode():
                        control.delete(CLAIM_KEY % db)
        finally:
            control.close()
            self.claimed.clear()

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

# `set_limits` ("none" clears a limit: unlimited on a tier); trees older than it get UNLIMITED_TIER.
UNLIMITED_FLAGS = ("--rpm", "none", "--rph", "none", "--tpm", "none", "--concurrency", "none",
                   "--max-tokens", "none", "--daily-budget", "none", "--monthly-budget", "none",
                   "--models", "")
UNLIMITED_TIER = """
from tenants.models import Tier
tier = Tier.objects.get(name={tier!r})
for name in Tier.LIMIT_NAMES:
    setattr(tier, name, None)  # blank limits are unlimited
tier.allowed_models = []
tier.save()
"""


def manage(env: dict, *args: str, timeout: float = 180, tree: Path | None = None) -> str:
    """`manage.py` of this checkout, or of `tree` (another one)."""
    result = subprocess.run([PY, "manage.py", *args], cwd=tree or ROOT, env=env, text=True,
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


# -- run helpers ------------------------------------------------------------------------------

def tree_state() -> str:
    """The commit measured, and whether the working tree differs from it (the platform's files)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "tenants", "billing",
                                "llm_platform"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    if not head:
        return "not a git checkout"
    return f"commit {head}" + (" + uncommitted changes" if dirty.strip() else "")


def checkout(ref: str, into: Path) -> str:
    """The files of commit `ref` (anything `git rev-parse` takes: a hash, HEAD~1, a branch)
    extracted into `into` (`git archive`: no worktree to unregister, the folder is all there
    is to remove); returns the full hash."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    if found.returncode != 0:
        raise ValueError(f"--baseline {ref}: not a commit of this repository")
    commit = found.stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        untar = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, capture_output=True, timeout=120)
    finally:
        archive.stdout.close()
        archive.wait(timeout=30)
    if archive.returncode != 0 or untar.returncode != 0:
        raise RuntimeError(f"git archive {commit[:10]} | tar -x failed: {untar.stderr.decode(errors='replace')[-500:]}")
    if not (into / "llm_platform" / "asgi.py").is_file():
        raise ValueError(f"--baseline {ref}: commit {commit[:10]} has no llm_platform/asgi.py")
    return commit


def migrations(tree: Path) -> dict[str, str]:
    """{path: digest} of the migration files of a checkout: two trees with equal maps have the same schema."""
    return {str(path.relative_to(tree)): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(tree.glob("*/migrations/*.py"))}


def imported_from(tree: Path, env: dict) -> Path:
    """Where a process started in `tree` imports the platform from (the same interpreter and env)."""
    found = subprocess.run([PY, "-c", "import llm_platform; print(llm_platform.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        raise RuntimeError(f"cannot import llm_platform in {tree}: {found.stderr[-1000:]}")
    return Path(found.stdout.strip()).resolve().parent.parent


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
    return procs.start(f"py-spy-{name}", [spy, "record", "--nonblocking", "--rate", os.environ.get("GW_BENCH_SPY_RATE", "200"), "--format", "raw",
                                          "--output", str(out / f"{name}.txt"), "--pid", str(pid)], env, cpu)


def drain_usage(redis_url: str, timeout: float = 30, poll: float = 0.2) -> tuple[int, int]:
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
            time.sleep(poll)
    finally:
        client.close()


def usage_rows(database_url: str) -> tuple[int, str]:
    import psycopg

    with psycopg.connect(database_url, connect_timeout=10) as conn:
        count, cost = conn.execute("SELECT count(*), coalesce(sum(cost_usd), 0) FROM billing_usagerecord").fetchone()
    return count, f"{cost:.6f}"
