"""`bash scripts/test`: run pytest against real PostgreSQL and Redis.

Uses DATABASE_URL / REDIS_URL when set, else the machine's servers on their default ports when
they answer, else embedded ones started for this run (and stopped after it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .embedded import EmbeddedPostgres, EmbeddedRedis, port_open

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    started = []
    claimed: list[int] = []
    # GW_TEST_FORCE_EMBEDDED=1 ignores the machine's servers (how CI proves the fallback works).
    force_embedded = env.get("GW_TEST_FORCE_EMBEDDED") == "1"
    scratch = ROOT / ".data" / f"test-embedded-{os.getpid()}"
    try:
        if not env.get("DATABASE_URL"):
            if port_open("127.0.0.1", 5432) and not force_embedded:
                # A name per run, so two runs on one machine never share a test database.
                env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/gw{os.getpid()}"
            else:
                print("[test] PostgreSQL not running on 5432: starting an embedded one", flush=True)
                shutil.rmtree(scratch / "postgres", ignore_errors=True)
                pg = EmbeddedPostgres(scratch / "postgres")
                env["DATABASE_URL"] = pg.start()
                started.append(pg)
        if not env.get("REDIS_URL"):
            if port_open("127.0.0.1", 6379) and not force_embedded:
                db = claim_redis_db("127.0.0.1", 6379)
                claimed.append(db)
                env["REDIS_URL"] = f"redis://127.0.0.1:6379/{db}"
            else:
                print("[test] Redis not running on 6379: starting an embedded one", flush=True)
                rd = EmbeddedRedis(scratch / "redis", persist=False)
                env["REDIS_URL"] = rd.start()
                started.append(rd)
        env.setdefault("GW_USAGE_SPOOL_DIR", str(scratch / "usage-spool"))  # rows of this run only
        env.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
        env.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")
        env.setdefault("LOG_LEVEL", "WARNING")
        print(f"[test] PostgreSQL {env['DATABASE_URL']}  Redis {env['REDIS_URL']}", flush=True)
        return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=ROOT, env=env)
    finally:
        for db in claimed:
            release_redis_db("127.0.0.1", 6379, db)
        for server in reversed(started):
            server.stop()
            if isinstance(server, EmbeddedPostgres):
                server.remove()
        shutil.rmtree(scratch, ignore_errors=True)


CLAIM_KEY = "gw:testrun:db:%d"
CLAIM_SECONDS = 3 * 3600  # a run killed before its cleanup frees its database after this


def claim_redis_db(host: str, port: int, dbs: list[int] | None = None) -> int:
    """A Redis database index this run owns outright: claimed with SET NX in database 0 (which
    the tests never use), so two runs on one machine never share one."""
    import redis

    control = redis.Redis(host=host, port=port, db=0)
    count = int(control.config_get("databases").get("databases", 16))
    take_over = control.register_script(_TAKE_OVER)
    try:
        for db in dbs or range(1, count):
            key = CLAIM_KEY % db
            won = control.set(key, os.getpid(), nx=True, ex=CLAIM_SECONDS)
            if not won:  # a run killed before its cleanup (SIGKILL, a timeout) left its claim
                holder = control.get(key)
                if holder is not None and not pid_alive(int(holder)):
                    won = take_over(keys=[key], args=[holder, os.getpid(), CLAIM_SECONDS])
            if won:
                redis.Redis(host=host, port=port, db=db).flushdb()
                return db
    finally:
        control.close()
    raise SystemExit(f"[test] every Redis database on {host}:{port} is claimed by another test run")


_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_redis_db(host: str, port: int, db: int) -> None:
    import redis

    redis.Redis(host=host, port=port, db=db).flushdb()
    redis.Redis(host=host, port=port, db=0).delete(CLAIM_KEY % db)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
