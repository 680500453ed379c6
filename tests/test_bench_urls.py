"""The benchmarks' set-up: their own Redis database (a unix socket URL keeps its socket path) and
the checkout of a baseline commit."""

import subprocess

import pytest
import redis

from bench._stack import ROOT, checkout, migrations, redis_db_url


def test_the_bench_database_of_a_unix_socket_url_is_its_db_query_not_its_path():
    url = redis_db_url("unix:///tmp/gw.sock?db=3&password=secret", 15)
    options = redis.connection.parse_url(url)
    assert (options["path"], options["db"], options["password"]) == ("/tmp/gw.sock", 15, "secret")


def test_the_bench_database_of_a_tcp_url_is_its_path():
    options = redis.connection.parse_url(redis_db_url("redis://:pw@127.0.0.1:6380/0", 15))
    assert (options["host"], options["port"], options["db"], options["password"]) == ("127.0.0.1", 6380, 15, "pw")


def test_a_baseline_ref_is_extracted_with_the_commit_it_names(tmp_path):

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tree = tmp_path / "baseline"
    assert checkout("HEAD", tree) == head
    assert (tree / "llm_platform" / "asgi.py").is_file()
    assert set(migrations(tree)) == {
        path for path in subprocess.run(["git", "ls-files", "*/migrations/*.py"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.split()}


def test_a_baseline_ref_that_names_no_commit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a commit"):
        checkout("no-such-branch-anywhere", tmp_path / "baseline")
    assert not (tmp_path / "baseline").exists()
