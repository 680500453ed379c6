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
                env["REDIS_URL"] = f"redis://127.0.0.1:6379/{9 + os.getpid() % 6}"
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
        for server in reversed(started):
            server.stop()
            if isinstance(server, EmbeddedPostgres):
                server.remove()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
