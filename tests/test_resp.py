"""The hot-path Redis client against a real Redis: replies, pipelining, scripts, failures.

Every test runs on the standard asyncio loop and on uvloop (what the server runs). Servers that
misbehave on purpose are small RESP stubs started in the test; everything else is real Redis.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import tempfile
import time
import uuid

import hiredis
import pytest
import redis.asyncio
import redis.exceptions as rx
import uvloop
from django.conf import settings
from redis.asyncio.connection import parse_url

from llm_platform.embedded import free_port
from llm_platform.redis import get_redis
from llm_platform.resp import (
    Function,
    RedisPyClient,
    RespClient,
    Script,
    get_resp,
    pack_args,
    pack_command,
)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
REDIS = parse_url(settings.REDIS_URL)
OK = b"+OK\r\n"


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    def run(coro):
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coro)
    return run


@pytest.fixture()
def prefix():
    """Keys of one test live under their own prefix and are deleted after it."""
    prefix = f"test:resp:{uuid.uuid4().hex[:10]}:"
    yield prefix
    keys = list(get_redis().scan_iter(prefix + "*", count=1000))
    if keys:
        get_redis().delete(*keys)


class Stub:
    """A server that speaks just enough RESP: `answer(command)` gives the reply, None for silence.

    With `then_proxy`, connections after the first are piped to the real Redis.
    """

    def __init__(self, answer=lambda command: None, then_proxy: bool = False, proxy: bool = False):
        self.answer = answer
        self.then_proxy = then_proxy
        self.proxy = proxy  # every connection piped to the real Redis
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.hung_up = 0  # connections the client closed
        self.server: asyncio.AbstractServer | None = None

    async def start_tcp(self, tls: ssl.SSLContext | None = None) -> int:
        port = free_port()
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port, ssl=tls)
        return port

    async def start_unix(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._handle, path)

    async def stop(self) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.proxy or (self.then_proxy and self.connections > 1):
            return await self._proxy(reader, writer)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    reply = self.answer(command)
                    if reply is not None:
                        writer.write(reply)
        except ConnectionError:
            pass
        self.hung_up += 1
        writer.close()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(REDIS.get("host", "localhost"), REDIS.get("port", 6379))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def answer_select_only(command: list[bytes]) -> bytes | None:
    return OK if command[0].upper() == b"SELECT" else None


async def eventually(condition, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# replies


def test_replies_come_back_as_hiredis_gives_them(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            assert await client.execute("SET", prefix + "s", "héllo") == b"OK"
            assert await client.execute("GET", prefix + "s") == "héllo".encode()
            assert await client.execute("GET", prefix + "missing") is None
            assert await client.execute("INCRBY", prefix + "n", 41) == 41
            assert await client.execute("RPUSH", prefix + "l", b"\x00\xff\r\n", 7, 0.5) == 3
            assert await client.execute("LRANGE", prefix + "l", 0, -1) == [b"\x00\xff\r\n", b"7", b"0.5"]
            assert await client.execute("PING") == b"PONG"
        finally:
            await client.aclose()

    run(main())


def test_execute_raises_an_error_reply_and_the_connection_goes_on(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("RPUSH", prefix + "l", "x")
            with pytest.raises(rx.ResponseError, match="WRONGTYPE"):
                await client.execute("INCR", prefix + "l")
            assert await client.execute("LLEN", prefix + "l") == 1
        finally:
            await client.aclose()

    run(main())


def test_execute_many_returns_error_replies_in_place(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            return await client.execute_many([
                ("SET", prefix + "k", 1), ("LPUSH", prefix + "k", "x"), ("INCR", prefix + "k"), ("GET", prefix + "none"),
            ])
        finally:
            await client.aclose()

    ok, error, incremented, missing = run(main())
    assert ok == b"OK" and incremented == 2 and missing is None
    assert isinstance(error, rx.ResponseError) and str(error).startswith("WRONGTYPE")


def test_arguments_of_other_types_are_refused(run):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            with pytest.raises(rx.DataError):
                await client.execute("SET", "k", True)
            with pytest.raises(rx.DataError):
                await client.execute("SET", "k", None)
        finally:
            await client.aclose()

    run(main())


# pipelining


def test_two_hundred_concurrent_callers_each_get_their_own_replies(run, prefix):
    async def one(client: RespClient, i: int):
        added = await client.execute("INCRBY", f"{prefix}{i}", i)
        read, length = await client.execute_many([("GET", f"{prefix}{i}"), ("STRLEN", f"{prefix}{i}")])
        return added, read, length

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(200)))
        finally:
            await client.aclose()

    assert run(main()) == [(i, str(i).encode(), len(str(i))) for i in range(200)]


def test_commands_issued_together_share_one_write(monkeypatch):
    """One write for the commands of one loop iteration (asyncio's transport can be watched,
    uvloop's cannot; the code path is the same)."""

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("PING")
            transport = client._conn._transport
            writes: list[bytes] = []
            real_write = transport.write

            def write(data: bytes) -> None:
                writes.append(data)
                real_write(data)

            monkeypatch.setattr(transport, "write", write)
            replies = await asyncio.gather(*(client.execute("ECHO", i) for i in range(50)))
            batched = list(writes)
            writes.clear()
            many = await client.execute_many([("ECHO", i) for i in range(10)])
            return replies, batched, many, writes
        finally:
            await client.aclose()

    replies, batched, many, writes = asyncio.run(main())
    assert replies == [str(i).encode() for i in range(50)]
    assert len(batched) == 1 and batched[0].count(b"ECHO") == 50
    assert many == [str(i).encode() for i in range(10)] and len(writes) == 1


def test_deferred_commands_go_first_in_the_next_write(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL, defer_s=30)  # only another request sends them
        try:
            deferred = asyncio.ensure_future(client.execute_many([("SET", f"{prefix}a", "1")], defer=True))
            await client.execute("PING")  # connected; the deferred SET went out with it, first
            await asyncio.sleep(0.05)
            seen_alone = get_redis().get(f"{prefix}a")
            late = asyncio.ensure_future(client.execute_many([("INCR", f"{prefix}a")], defer=True))
            await asyncio.sleep(0.1)
            waiting = get_redis().get(f"{prefix}a"), late.done()
            after = await client.execute("GET", f"{prefix}a")  # rides with the INCR, after it
            return await deferred, seen_alone, waiting, after, await late
        finally:
            await client.aclose()

    done, seen_alone, waiting, after, late = run(main())
    assert done == [b"OK"] and seen_alone == b"1"
    assert waiting == (b"1", False)  # deferred: not written while nothing else goes out
    assert after == b"2" and late == [2]


def test_a_deferred_command_alone_goes_out_within_the_deferral(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL, defer_s=0.05)
        try:
            await client.execute("PING")
            started = time.monotonic()
            reply = await client.execute_many([("INCR", f"{prefix}b")], defer=True)
            return reply, time.monotonic() - started
        finally:
            await client.aclose()

    reply, waited = run(main())
    assert reply == [1] and 0.04 <= waited < 1.0


def test_concurrent_first_callers_share_one_connect(run):
    stub = Stub(lambda command: b"+PONG\r\n")

    async def main():
        port = await stub.start_tcp()
        client = RespClient(f"redis://127.0.0.1:{port}")
        try:
            return await asyncio.gather(*(client.execute("PING") for _ in range(20)))
        finally:
            await client.aclose()
            await stub.stop()

    assert run(main()) == [b"PONG"] * 20
    assert stub.connections == 1


def test_a_cancelled_caller_does_not_shift_the_replies(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute_many([("SET", prefix + "a", "one"), ("SET", prefix + "b", "two")])
            lost = asyncio.create_task(client.execute("GET", prefix + "a"))
            lost_many = asyncio.create_task(client.execute_many([("GET", prefix + "a"), ("GET", prefix + "a")]))
            await asyncio.sleep(0)  # both are sent and waiting for their replies
            lost.cancel()
            lost_many.cancel()
            after = await client.execute("GET", prefix + "b")
            return lost.cancelled(), lost_many.cancelled(), after, await client.execute("GET", prefix + "b")
        finally:
            await client.aclose()

    assert run(main()) == (True, True, b"two", b"two")


# scripts


ECHO_LUA = "return {KEYS[1], KEYS[2], ARGV[1], string.format('%.17g', tonumber(ARGV[2])), ARGV[3]}"


def test_evalsha_passes_keys_and_args_and_keeps_float_precision(run, prefix):
    script = Script(ECHO_LUA)

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            return await client.evalsha(script, [prefix + "k1", prefix + "k2"], [10**19, 1 / 3, b"\x00raw"])
        finally:
            await client.aclose()

    k1, k2, big, third, raw = run(main())
    assert script.sha == get_redis().script_load(ECHO_LUA)  # the same SHA1 Redis computes
    assert (k1, k2, big, raw) == ((prefix + "k1").encode(), (prefix + "k2").encode(), b"10000000000000000000", b"\x00raw")
    assert float(third) == 1 / 3  # Lua read back the exact double


def test_evalsha_raises_the_scripts_error(run):
    script = Script("return redis.error_reply('LIMIT refused')")

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            with pytest.raises(rx.ResponseError, match="LIMIT refused"):
                await client.evalsha(script, [], [])
        finally:
            await client.aclose()

    run(main())


def test_scripts_are_loaded_again_after_script_flush(run, prefix):
    marker = uuid.uuid4().hex  # a script Redis has never seen
    counter = Script(f"-- {marker}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    echo = Script(f"-- {marker}\nreturn ARGV[1]")
    failing = Script(f"-- {marker}\nreturn redis.error_reply('nope')")

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            first = await client.evalsha(counter, [prefix + "n"], [1])  # NOSCRIPT: loaded on demand
            get_redis().script_flush()
            second = await client.evalsha(counter, [prefix + "n"], [10])
            get_redis().script_flush()
            many = await client.evalsha_many([
                (counter, [prefix + "n"], [100]), (echo, [], ["e"]), (failing, [], []), (counter, [prefix + "n"], [1000]),
            ])
            return first, second, many
        finally:
            await client.aclose()

    first, second, (a, b, error, c) = run(main())
    assert (first, second, a, b, c) == (1, 11, 111, b"e", 1111)
    assert isinstance(error, rx.ResponseError) and "nope" in str(error)
    assert get_redis().script_exists(counter.sha, echo.sha, failing.sha) == [True, True, True]


def test_a_function_is_loaded_when_redis_lacks_it_and_keeps_its_state_between_calls(run, prefix):
    name = f"t_{uuid.uuid4().hex[:8]}"
    counter = Function(f"#!lua name={name}\nlocal calls = 0\nredis.register_function('{name}', function(keys, args)\n"
                       "  calls = calls + 1\n  return {calls, redis.call('INCRBY', keys[1], args[1])}\nend)\n", name)

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            first = await client.evalsha(counter, [prefix + "n"], [1])  # not loaded: loaded, then called
            second = await now(client, counter, counter.pack([prefix + "n"], [10]))
            get_redis().function_delete(counter.name)  # what a restart or FUNCTION FLUSH does
            third = await now(client, counter, counter.pack([prefix + "n"], [100]))
            fourth = await client.evalsha_many([(counter, [prefix + "n"], [1000])])
            return first, second, third, fourth
        finally:
            await client.aclose()
            get_redis().function_delete(counter.name)

    assert run(main()) == ([1, 1], [2, 11], [1, 111], [[2, 1111]])  # loaded again: its state starts over


def test_a_function_is_named_after_its_source_so_that_two_versions_run_side_by_side():
    source = "#!lua name=lib\nredis.register_function('lib', function(keys, args) return {VERSION} end)\n"
    one, two = Function(source.replace("{VERSION}", "1"), "lib"), Function(source.replace("{VERSION}", "2"), "lib")
    assert one.name.startswith("lib_") and two.name.startswith("lib_") and one.name != two.name
    try:
        get_redis().function_load(one.source)
        get_redis().function_load(two.source)  # both loaded at once
        assert (get_redis().fcall(one.name, 0), get_redis().fcall(two.name, 0)) == (1, 2)
    finally:
        for function in (one, two):
            get_redis().function_delete(function.name)
    with pytest.raises(ValueError, match="must start with"):
        Function("redis.register_function('lib', function() return 1 end)", "lib")


def test_a_command_assembled_from_packed_pieces_is_the_packed_command():
    script = Script(ECHO_LUA)
    keys, args = ["k1", "k2"], [10**19, 1 / 3, b"\x00raw", "a", 7]
    assembled = script.assemble(2, [pack_args(keys[:1]), pack_args(keys[1:])], 6, [pack_args(args), pack_args(["tail"])])
    assert assembled == script.pack(keys, [*args, "tail"])


def now(client: RespClient, script: Script, data: bytes) -> asyncio.Future:
    """`call_now` with a future as its sink (a future is one: done, set_result, set_exception)."""
    sink = asyncio.get_running_loop().create_future()
    client.call_now(script, data, sink)
    return sink


def test_call_now_writes_at_once_and_loads_a_flushed_script(run, prefix):
    marker = uuid.uuid4().hex
    counter = Script(f"-- {marker}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    failing = Script(f"-- {marker}\nreturn redis.error_reply('nope')")

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            first = await now(client, counter, counter.pack([prefix + "n"], [1]))  # not connected yet
            written = []
            conn = client._conn

            class Recording:  # the transport, noting each write
                def __init__(self, transport):
                    self.transport = transport

                def write(self, data):
                    written.append(data)
                    self.transport.write(data)

                def __getattr__(self, name):
                    return getattr(self.transport, name)

            conn._transport = Recording(conn._transport)
            get_redis().script_flush()
            pending = now(client, counter, counter.pack([prefix + "n"], [10]))
            at_once = len(written)  # before this loop iteration ended
            second = await pending  # NOSCRIPT: loaded, then run
            error = await now(client, failing, failing.pack([], []))
            return first, at_once, second, error
        finally:
            await client.aclose()

    first, at_once, second, error = run(main())
    assert (first, at_once, second) == (1, 1, 11)
    assert isinstance(error, rx.ResponseError) and "nope" in str(error)


def test_a_script_that_does_not_compile_reports_the_compile_error(run):
    broken = Script(f"-- {uuid.uuid4().hex}\nreturn (")

    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            with pytest.raises(rx.ResponseError) as raised:
                await client.evalsha(broken, [], [])
            many = await client.evalsha_many([(broken, [], []), (Script("return 7"), [], [])])
            return str(raised.value), many
        finally:
            await client.aclose()

    message, (error, seven) = run(main())
    assert "NOSCRIPT" not in message and "Error compiling script" in message
    assert isinstance(error, rx.ResponseError) and "Error compiling script" in str(error) and seven == 7


# connecting


def test_the_db_in_the_url_is_selected(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("SET", prefix + "where", "here")
            return await client.execute("CLIENT", "INFO")
        finally:
            await client.aclose()

    info = run(main())
    assert f" db={REDIS.get('db', 0)} ".encode() in info
    assert get_redis().get(prefix + "where") == b"here"  # redis-py reads the same db


def test_credentials_and_db_are_sent_on_connect_over_a_unix_socket(run):
    stub = Stub(lambda command: OK)

    async def main():
        with tempfile.TemporaryDirectory(prefix="resp") as folder:
            await stub.start_unix(f"{folder}/redis.sock")
            client = RespClient(f"unix://alice:s%40cret@{folder}/redis.sock?db=3")
            try:
                return await client.execute("PING")
            finally:
                await client.aclose()
                await stub.stop()

    assert run(main()) == b"OK"
    assert stub.commands == [[b"AUTH", b"alice", b"s@cret"], [b"SELECT", b"3"], [b"PING"]]


def test_a_refused_auth_raises_authentication_error_without_the_password(run):
    stub = Stub(lambda command: b"-WRONGPASS invalid username-password pair\r\n" if command[0] == b"AUTH" else OK)

    async def main():
        port = await stub.start_tcp()
        client = RespClient(f"redis://:hunter2@127.0.0.1:{port}/2")
        try:
            with pytest.raises(rx.AuthenticationError) as raised:
                await client.execute("PING")
            return raised.value
        finally:
            await client.aclose()
            await stub.stop()

    error = run(main())
    assert "WRONGPASS" in str(error) and "hunter2" not in str(error)
    assert stub.commands[:2] == [[b"AUTH", b"hunter2"], [b"SELECT", b"2"]]


def test_a_connect_to_a_closed_port_fails_fast_and_keeps_the_password_out(run):
    port = free_port()  # nothing listens there

    async def main():
        client = RespClient(f"redis://user:hunter2@127.0.0.1:{port}/0", timeout=2.0)
        errors = []
        for _ in range(2):  # the second call tries again, and fails the same way
            started = time.monotonic()
            with pytest.raises(rx.ConnectionError) as raised:
                await client.execute("PING")
            errors.append((time.monotonic() - started, raised.value))
        return errors

    for took, error in run(main()):
        assert took < 1.0
        assert f"127.0.0.1:{port}" in str(error) and "hunter2" not in str(error) + repr(error)


def test_a_server_that_never_answers_the_handshake_times_out_the_connect(run):
    stub = Stub()  # reads, never answers

    async def main():
        port = await stub.start_tcp()
        client = RespClient(f"redis://127.0.0.1:{port}/8", timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(rx.TimeoutError):
                await client.execute("PING")
            return time.monotonic() - started
        finally:
            await client.aclose()
            await stub.stop()

    assert 0.25 <= run(main()) < 1.3  # the loop clock ticks in ms: 0.3 s may read 0.2999


# failures and recovery


def test_a_redis_that_stops_answering_times_out_every_pending_call_then_reconnects(run, prefix):
    stub = Stub(answer_select_only, then_proxy=True)  # the first connection goes silent after SELECT
    db = REDIS.get("db", 0)

    async def main():
        port = await stub.start_tcp()
        client = RespClient(f"redis://127.0.0.1:{port}/{db}", timeout=0.4)
        try:
            started = time.monotonic()
            async with asyncio.timeout(5):  # without the watchdog they would wait forever
                outcomes = await asyncio.gather(
                    client.execute("GET", prefix + "a"),
                    client.execute("GET", prefix + "b"),
                    client.execute_many([("GET", prefix + "c"), ("GET", prefix + "d")]),
                    client.evalsha(Script("return 1"), [], []),
                    return_exceptions=True)
            took = time.monotonic() - started
            closed = await eventually(lambda: stub.hung_up == 1)  # the client dropped the connection
            again = await client.execute("SET", prefix + "back", "yes")  # a new connection, proxied
            return outcomes, took, closed, again
        finally:
            await client.aclose()
            await stub.stop()

    outcomes, took, closed, again = run(main())
    assert all(isinstance(outcome, rx.TimeoutError) for outcome in outcomes), outcomes
    assert 0.4 <= took < 1.4
    assert closed and again == b"OK" and stub.connections == 2
    assert get_redis().get(prefix + "back") == b"yes"  # and the new connection selected the db


def test_calls_in_flight_when_the_connection_dies_fail_with_connection_error(run, prefix):
    async def main():
        client, killer = RespClient(settings.REDIS_URL), RespClient(settings.REDIS_URL)
        try:
            own_id = await client.execute("CLIENT", "ID")
            blocked = asyncio.create_task(client.execute("BLPOP", prefix + "empty", 5))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            assert await killer.execute("CLIENT", "KILL", "ID", own_id) == 1
            with pytest.raises(rx.ConnectionError):
                await blocked
            took = time.monotonic() - started
            return own_id, took, await client.execute("CLIENT", "ID")
        finally:
            await client.aclose()
            await killer.aclose()

    old_id, took, new_id = run(main())
    assert took < 1.0 and new_id != old_id


def test_a_connection_killed_server_side_is_replaced_by_the_next_call(run, prefix):
    async def main():
        client = RespClient(settings.REDIS_URL)
        try:
            old_id = await client.execute("CLIENT", "ID")
            get_redis().client_kill_filter(_id=old_id)
            await asyncio.sleep(0.05)  # the loop sees the hang-up
            new_id = await client.execute("CLIENT", "ID")
            await client.execute("SET", prefix + "k", "after")
            return old_id, new_id
        finally:
            await client.aclose()

    old_id, new_id = run(main())
    assert new_id != old_id
    assert get_redis().get(prefix + "k") == b"after"


def test_get_resp_gives_one_client_per_event_loop(run, prefix):
    async def main():
        client = get_resp()
        assert get_resp() is client
        await client.execute("INCR", prefix + "n")
        await client.aclose()
        return client

    first, second = run(main()), run(main())
    assert first is not second
    assert get_redis().get(prefix + "n") == b"2"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, key, issuer_name, issuer_key, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def save(name: str, key, cert: x509.Certificate) -> None:
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca = issue("gateway test CA", ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    save("ca", ca_key, ca)
    for name, extensions in [
        ("server", [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)]),
        ("client", []),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        save(name, key, issue(name, key, ca_name, ca_key, extensions))
    return folder


def tls_server(certificates, client_certificates: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    if client_certificates:
        context.load_verify_locations(certificates / "ca.pem")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def ping_each(urls: list[str]) -> list:
    """PING through each URL: the reply, or the exception."""
    out = []
    for url in urls:
        client = RespClient(url)
        try:
            out.append(await client.execute("PING"))
        except rx.RedisError as exc:
            out.append(exc)
        finally:
            await client.aclose()
    return out


def test_rediss_urls_are_read_as_redis_py_reads_them(run, certificates):
    async def main():
        stub = Stub(proxy=True)  # TLS in front of the real Redis
        port = await stub.start_tcp(tls_server(certificates))
        try:
            base = f"rediss://127.0.0.1:{port}/0"
            return await ping_each([f"{base}?ssl_ca_certs={certificates / 'ca.pem'}",
                                    f"{base}?ssl_cert_reqs=none",
                                    base])
        finally:
            await stub.stop()

    trusted, unverified, unknown_ca = run(main())
    assert (trusted, unverified) == (b"PONG", b"PONG")
    assert isinstance(unknown_ca, rx.ConnectionError) and "certificate verify failed" in str(unknown_ca).lower()


def test_a_client_certificate_from_the_url_is_presented(run, certificates):
    async def main():
        stub = Stub(proxy=True)
        port = await stub.start_tcp(tls_server(certificates, client_certificates=True))
        try:
            base = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificates / 'ca.pem'}"
            return await ping_each([f"{base}&ssl_certfile={certificates / 'client.pem'}"
                                    f"&ssl_keyfile={certificates / 'client.key'}",
                                    base])
        finally:
            await stub.stop()

    with_certificate, without = run(main())
    assert with_certificate == b"PONG"
    assert isinstance(without, rx.ConnectionError)


def test_an_unknown_ssl_cert_reqs_is_refused_clearly():
    from llm_platform.resp import tls_context

    with pytest.raises(ValueError, match="ssl_cert_reqs must be none, optional or required"):
        tls_context({"ssl_cert_reqs": "sometimes"})
    assert tls_context({"ssl_cert_reqs": "optional"}).verify_mode == ssl.CERT_OPTIONAL
    assert tls_context({"ssl_check_hostname": False}).check_hostname is False


def test_a_wrong_tls_setting_in_redis_url_stops_the_server_at_start():
    """An operator's typo in REDIS_URL is reported when the server starts, not by the first
    request's 503: the ASGI lifespan builds the Redis client, and start-up fails with the reason."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llm_platform.embedded import free_port

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "REDIS_URL": "rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes", "LOG_LEVEL": "WARNING"}
    started = subprocess.run(
        [sys.executable, "-m", "uvicorn", "llm_platform.asgi:application", "--host", "127.0.0.1",
         "--port", str(free_port()), "--lifespan", "on", "--no-access-log"],
        cwd=root, env=env, capture_output=True, text=True, timeout=30)
    assert started.returncode != 0
    assert "ssl_cert_reqs must be none, optional or required, not 'sometimes'" in started.stdout + started.stderr


class Landing:
    """A rider (`call_now`): a packed command and a sink for its reply."""

    def __init__(self, *command):
        self.command = pack_command(command)
        self.outcomes: list = []

    def done(self) -> bool:
        return False

    def set_result(self, reply) -> None:
        self.outcomes.append(reply)

    def set_exception(self, exc: BaseException) -> None:
        self.outcomes.append(exc)


CLIENTS = {"resp": lambda: RespClient(settings.REDIS_URL),
           "redis-py": lambda: RedisPyClient(redis.asyncio.Redis.from_url(settings.REDIS_URL, protocol=2))}


@pytest.mark.parametrize("client_kind", sorted(CLIENTS))
def test_riders_go_after_the_call_each_with_its_own_reply_and_never_again(run, prefix, client_kind):
    """Both clients behind the hot path's interface: the riders follow the call in its write and
    get their own replies (an error reply too); when Redis lacks the script, the call is loaded
    and sent again, the riders are not."""
    marker = uuid.uuid4().hex
    counter = Script(f"-- {marker}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")

    async def main():
        client = CLIENTS[client_kind]()
        try:
            get_redis().script_flush()
            riders = [Landing("INCRBY", prefix + "r", 5), Landing("HGET", prefix + "r", "x")]  # the second: WRONGTYPE
            sink = asyncio.get_running_loop().create_future()
            client.call_now(counter, counter.pack([prefix + "n"], [1]), sink, riders)
            return await sink, riders
        finally:
            await client.aclose()

    reply, (added, wrong) = run(main())
    assert reply == 1
    assert added.outcomes == [5] and get_redis().get(prefix + "r") == b"5"  # written once
    assert len(wrong.outcomes) == 1 and isinstance(wrong.outcomes[0], rx.ResponseError)
