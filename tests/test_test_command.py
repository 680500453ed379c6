"""The test command works when no PostgreSQL or Redis runs: it starts embedded ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_test_command_falls_back_to_embedded_servers():
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["GW_TEST_FORCE_EMBEDDED"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "llm_platform.testrun", "tests/billing/test_usage_writer.py", "-k", "duplicate or cost", "-p", "no:randomly"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "starting an embedded one" in output and "2 passed" in output
    assert "127.0.0.1:5432" not in output.split("[test] PostgreSQL", 1)[1].splitlines()[0]


def test_two_test_runs_never_share_a_redis_database():
    from llm_platform.testrun import claim_redis_db, release_redis_db

    first = claim_redis_db("127.0.0.1", 6379)
    second = claim_redis_db("127.0.0.1", 6379)
    try:
        assert first != second
        assert os.environ["REDIS_URL"].rsplit("/", 1)[1] not in (str(first), str(second))
    finally:
        release_redis_db("127.0.0.1", 6379, first)
        release_redis_db("127.0.0.1", 6379, second)
    import redis

    assert redis.Redis(db=0).get(f"gw:testrun:db:{first}") is None


def test_a_claim_left_by_a_killed_run_is_taken_over():
    import subprocess as sp

    import redis

    from llm_platform.testrun import CLAIM_KEY, claim_redis_db, release_redis_db

    dead = sp.Popen(["true"])
    dead.wait()
    control = redis.Redis(db=0)
    taken = [db for db in range(1, 16) if control.exists(CLAIM_KEY % db)]
    free = next(db for db in range(1, 16) if db not in taken)
    control.set(CLAIM_KEY % free, dead.pid, ex=60)  # as a run killed before its cleanup leaves it
    try:
        assert claim_redis_db("127.0.0.1", 6379, dbs=[free]) == free
        assert int(control.get(CLAIM_KEY % free)) == os.getpid()
    finally:
        release_redis_db("127.0.0.1", 6379, free)
