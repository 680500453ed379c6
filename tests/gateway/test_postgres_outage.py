"""A PostgreSQL that restarts, or hangs, under a running server process.

The test owns that PostgreSQL (an EmbeddedPostgres on a free port) and a Redis database of its
own, so stopping it touches no other test. The server is a real uvicorn process, never restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
from django.conf import settings

from llm_platform.embedded import EmbeddedPostgres
from llm_platform.testrun import claim_redis_db, release_redis_db
from tenants.auth import redis_key
from tenants.models import KEY_PREFIX, hash_key
from tests.conftest import ROOT, Server

ROUTES = """
routes:
  - model: local
    lanes:
      - provider: local
        upstream_model: local
        context_window: 32768
        options: {tokens_per_second: 0}
"""
SETUP = """
from tenants.services import issue_key
from django.core.management import call_command
call_command("create_tenant", "outage-co")
for _ in range(4):
    print(issue_key("outage-co")[1])
"""
CALL_TIMEOUT_S = 1.0  # the server's GW_DB_CALL_TIMEOUT
CONNECT_TIMEOUT_S = 2  # libpq's smallest
LOCAL_CACHE_S = 0.2  # the server's own copies of keys and routes expire this fast


class OwnedPostgres:
    """An EmbeddedPostgres this module starts, stops, restarts and freezes."""

    def __init__(self) -> None:
        self.pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="gw-outage-pg-")))
        self.url = self.pg.start()

    def stop(self) -> None:
        self.pg.stop()

    def restart(self) -> None:
        if (self.pg.pgdata / "postmaster.pid").exists():
            return  # running
        # pg_ctl again on the same data folder (EmbeddedPostgres.start() would place it anew)
        sockdir = self.pg.data_dir / "pgsock"
        self.pg._run("pg_ctl", ["-w", "-o", f"-h 127.0.0.1 -p {self.pg.port} -k {sockdir}",
                                "-l", str(self.pg.data_dir / "postgres.log"), "start"])

    def pids(self) -> list[int]:
        """The postmaster and every backend and helper process it started."""
        if not (self.pg.pgdata / "postmaster.pid").exists():
            return []
        postmaster = int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)],
                                  capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def signal(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        self.signal(signal.SIGCONT)
        self.pg.stop()
        self.pg.remove()


def manage(env: dict, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, input=stdin,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    """(server, postgres, keys): a server over a PostgreSQL of our own, with four fresh keys."""
    redis_url = urlparse(settings.REDIS_URL)
    redis_db = claim_redis_db(redis_url.hostname, redis_url.port)
    pg = OwnedPostgres()
    server = None
    try:
        env = {**os.environ, "DATABASE_URL": pg.url,
               "REDIS_URL": f"redis://{redis_url.hostname}:{redis_url.port}/{redis_db}"}
        routes = tmp_path_factory.mktemp("outage") / "routes.yaml"
        routes.write_text(ROUTES)
        manage(env, "migrate", "--noinput")
        manage(env, "load_routes", str(routes))
        keys = [w for w in manage(env, "shell", stdin=SETUP).split() if w.startswith(KEY_PREFIX)]
        assert len(keys) == 4
        server = Server({**env, "GW_DB_CALL_TIMEOUT": str(CALL_TIMEOUT_S),
                         "GW_DB_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S),
                         "GW_LOCAL_CACHE_SECONDS": str(LOCAL_CACHE_S)})
        server.redis = redis.Redis.from_url(env["REDIS_URL"])
        yield server, pg, keys
    finally:
        if server is not None:
            server.stop()
        pg.remove()
        release_redis_db(redis_url.hostname, redis_url.port, redis_db)


def call(server: Server, path: str, key: str | None = None) -> tuple[int, dict, dict]:
    """(status, lower-cased headers, JSON body) of a chat completion (or a GET of `path`)."""
    if path == "chat":
        body = json.dumps({"model": "local", "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    else:
        request = urllib.request.Request(f"{server.url}{path}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def timed(server: Server, path: str, key: str | None = None) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    status, headers, body = call(server, path, key)
    return status, headers, body, time.monotonic() - started


def until_ok(server: Server, path: str, key: str | None = None, within_s: float = 15.0) -> int:
    """Poll until 200 (PostgreSQL is back); the statuses seen on the way are returned last."""
    deadline = time.monotonic() + within_s
    while True:
        status = call(server, path, key)[0]
        if status == 200 or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_postgres_restart_gives_503_while_down_and_serves_again_without_a_server_restart(outage):
    server, pg, (cached, uncached, _, _) = outage
    assert call(server, "chat", cached)[0] == 200
    assert call(server, "/ready")[0] == 200
    pid = server.proc.pid

    pg.stop()
    try:
        status, headers, body = call(server, "chat", uncached)
        assert status == 503 and body["error"]["code"] == "database_unavailable"
        assert body["error"]["type"] == "server_error" and int(headers["retry-after"]) >= 1
        # The server's own copy of the key and of the route table, past their freshness, still
        # serve: the shared Redis copy is gone too.
        server.redis.delete(redis_key(hash_key(cached)))
        time.sleep(LOCAL_CACHE_S * 1.5)
        assert call(server, "chat", cached)[0] == 200
        status, headers, body = call(server, "/ready")
        assert status == 503 and body["checks"]["postgres"].startswith("error") and headers["retry-after"]
    finally:
        pg.restart()
    assert until_ok(server, "chat", uncached) == 200
    assert call(server, "/ready")[0] == 200
    assert server.proc.pid == pid and server.proc.poll() is None


def test_hung_postgres_cannot_hold_a_request_or_ready_and_a_bad_key_is_refused_at_once(outage):
    server, pg, (cached, _, uncached, later) = outage
    assert until_ok(server, "chat", cached) == 200
    assert until_ok(server, "/ready") == 200  # the server holds a live connection now
    bound = CALL_TIMEOUT_S + CONNECT_TIMEOUT_S + 2.0  # whichever timeout fires, plus slack

    pg.signal(signal.SIGSTOP)
    try:
        status, _, body, took = timed(server, "chat", uncached)
        assert status == 503 and body["error"]["code"] == "database_unavailable" and took < bound
        status, _, body, took = timed(server, "/ready")
        assert status == 503 and body["checks"]["postgres"].startswith("error") and took < bound
        bad_key = KEY_PREFIX + "x" * 43 + "zzzzzz"  # the shape of a key, but not its checksum
        status, _, body, took = timed(server, "chat", bad_key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and took < 1.0
        server.redis.delete(redis_key(hash_key(cached)))
        time.sleep(LOCAL_CACHE_S * 1.5)  # the process's own copy is stale, Redis has none
        for _ in range(3):
            status, _, _, took = timed(server, "chat", cached)
            assert status == 200 and took < bound
    finally:
        pg.signal(signal.SIGCONT)
    assert until_ok(server, "chat", later) == 200
    assert call(server, "/ready")[0] == 200
