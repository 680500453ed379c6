"""The benchmarks' own Redis database: a unix socket URL keeps its socket path."""

import redis

from bench._stack import redis_db_url


def test_the_bench_database_of_a_unix_socket_url_is_its_db_query_not_its_path():
    url = redis_db_url("unix:///tmp/gw.sock?db=3&password=secret", 15)
    options = redis.connection.parse_url(url)
    assert (options["path"], options["db"], options["password"]) == ("/tmp/gw.sock", 15, "secret")


def test_the_bench_database_of_a_tcp_url_is_its_path():
    options = redis.connection.parse_url(redis_db_url("redis://:pw@127.0.0.1:6380/0", 15))
    assert (options["host"], options["port"], options["db"], options["password"]) == ("127.0.0.1", 6380, 15, "pw")
