"""A lean asyncio Redis client for the request hot path: one pipelined connection per event loop.

redis-py's asyncio client spends ~4x the CPU per EVALSHA of a plain `asyncio.Protocol` feeding
`hiredis.Reader`, and the gateway runs two Lua scripts per request. This client is that protocol,
made safe to share: the commands issued in one event-loop iteration go out in one write at its
end (writing at once when nothing is in flight measured no better), replies are matched to
callers first in first out, and one watchdog timer per connection fails every pending call when
Redis stops answering. Replies are what hiredis gives (bytes, ints, lists,
None), like redis-py with `decode_responses=False`. Failures raise `redis.exceptions` classes;
the next call after a failure reconnects.

Calls in flight when a connection drops fail with `ConnectionError` and are not retried: a
command may have run before its reply was lost, and our scripts are not idempotent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import hiredis
import redis.exceptions as rx
from django.conf import settings
from redis.asyncio.connection import SSLConnection, parse_url

from llm_platform.redis import SOCKET_TIMEOUT

log = logging.getLogger(__name__)

ResponseError = rx.ResponseError

_CRLF = b"\r\n"
_BULK_HEADS = [b"$%d\r\n" % n for n in range(256)]  # "$<len>\r\n" for short arguments


def _pack_into(out: list, args) -> None:
    """Append the RESP bulk strings for `args` to `out` (a list joined later)."""
    append = out.append
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is float:
            arg = repr(arg).encode()  # the shortest string that reads back as the same float
        elif kind is not bytes:
            arg = _coerce(arg)
        size = len(arg)
        append(_BULK_HEADS[size] if size < 256 else b"$%d\r\n" % size)
        append(arg)
        append(_CRLF)


def _coerce(arg) -> bytes:
    if isinstance(arg, bool) or not isinstance(arg, bytes | bytearray | memoryview | str | int | float):
        raise rx.DataError(f"Invalid input of type {type(arg).__name__}: convert to bytes, str, int or float first")
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return str(int(arg)).encode()
    if isinstance(arg, float):
        return repr(float(arg)).encode()
    return bytes(arg)


def _pack(args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    _pack_into(out, args)
    return b"".join(out)


class Script:
    """A Lua script, called by its SHA1; Redis is asked to load it only when it says NOSCRIPT."""

    __slots__ = ("source", "sha", "_head")

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha.encode() + _CRLF

    def pack(self, keys: list, args: list) -> bytes:
        """The call (EVALSHA; FCALL for a `Function`) in RESP, for `evalsha_packed`."""
        out = [b"*%d\r\n" % (3 + len(keys) + len(args)), self._head]
        _pack_into(out, (len(keys), *keys, *args))
        return b"".join(out)

    def assemble(self, n_keys: int, keys: list[bytes], n_args: int, args: list[bytes]) -> bytes:
        """The call from keys and arguments already packed (`pack_args`):
        `n_keys` keys in `keys`, `n_args` arguments in `args`."""
        count = b"%d" % n_keys
        return b"".join((b"*%d\r\n" % (3 + n_keys + n_args), self._head, b"$%d\r\n%b\r\n" % (len(count), count),
                         *keys, *args))

    def missing(self, reply) -> bool:
        """Whether `reply` says Redis does not have this script (then `load` is sent, and the call again)."""
        return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")

    @property
    def load(self) -> bytes:
        return _pack(("SCRIPT", "LOAD", self.source))

    def __repr__(self) -> str:
        return f"Script({self.sha})"


class Function(Script):
    """A Redis Function library (Redis 7+) of one function, called by name with `FCALL`; loaded
    when Redis says it has no such function. Unlike a script, a library keeps state between
    calls (its top-level locals) for as long as Redis keeps it.

    `source` registers its function under the library's own name (`#!lua name=<name>` and
    `redis.register_function('<name>', ...)`). Both are renamed `<name>_<hash of the source>`, so
    that processes running two versions of the code (during a deploy) each call their own."""

    __slots__ = ("name",)

    def __init__(self, source: str, name: str):
        shebang, quoted = f"#!lua name={name}\n", f"'{name}'"
        if not source.startswith(shebang) or source.count(quoted) != 1:
            raise ValueError(f"a library must start with {shebang!r} and register one function {quoted}")
        digest = hashlib.sha1(source.encode()).hexdigest()
        self.name = f"{name}_{digest[:16]}"
        super().__init__(source.replace(shebang, f"#!lua name={self.name}\n", 1).replace(quoted, f"'{self.name}'"))
        self._head = b"$5\r\nFCALL\r\n" + pack_args((self.name,))

    def missing(self, reply) -> bool:
        return isinstance(reply, ResponseError) and "function not found" in str(reply).lower()

    @property
    def load(self) -> bytes:
        return _pack(("FUNCTION", "LOAD", "REPLACE", self.source))  # REPLACE: another process may load it first

    def __repr__(self) -> str:
        return f"Function({self.name})"


def pack_command(args) -> bytes:
    """A whole command in RESP (for a rider: `RespClient.call_now`)."""
    return _pack(args)


def pack_args(args) -> bytes:
    """Arguments as consecutive RESP bulk strings (a piece of a command, for `Script.assemble`)."""
    out: list[bytes] = []
    _pack_into(out, args)
    return b"".join(out)


def raise_errors(replies: list) -> list:
    """`replies` of `execute_many` / `evalsha_packed`, or the first error reply among them raised."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


class _Batch:
    """Collects the replies of `execute_many`: one waiter for n FIFO slots."""

    __slots__ = ("future", "replies", "size")

    def __init__(self, future: asyncio.Future, size: int):
        self.future = future
        self.replies: list = []
        self.size = size

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, reply) -> None:
        self.replies.append(reply)
        if len(self.replies) == self.size:
            self.future.set_result(self.replies)

    def set_exception(self, exc: BaseException) -> None:
        self.future.set_exception(exc)


class _Connection(asyncio.Protocol):
    """One socket: buffers requests until the end of the loop iteration, hands replies out FIFO."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, where: str,
                 on_close: Callable[[_Connection], None], defer_s: float = 0.0):
        self._loop = loop
        self._timeout = timeout
        self._defer_s = defer_s
        self._where = where
        self._on_close = on_close
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ResponseError, protocolError=rx.InvalidResponse)
        self._pending: deque = deque()  # futures (or _Batch), oldest first
        self._buffer: list[bytes] = []
        self._queued = 0  # requests ever queued; minus len(_pending) = replies received
        self._sent: deque[tuple[int, float]] = deque()  # (_queued after a write, loop time of it)
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False  # a write is due at the end of this loop iteration
        self._later: asyncio.TimerHandle | None = None  # a write of deferred requests is due
        self._lost = loop.create_future()
        self.closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            while (reply := reader.gets()) is not False:
                waiter = pending.popleft()
                if not waiter.done():  # a cancelled caller's reply is dropped, the order kept
                    waiter.set_result(reply)  # a sink (`call_now`) handles it here and now
        except (rx.InvalidResponse, IndexError):
            self._fail(rx.ConnectionError, f"Protocol error from Redis at {self._where}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rx.ConnectionError, f"Connection to Redis at {self._where} lost", cause=exc)
        if not self._lost.done():
            self._lost.set_result(None)

    # requests

    def request(self, data: bytes, defer: bool = False, now: bool = False,
                sink: Sink | None = None) -> asyncio.Future | Sink:
        """`now`: write at once, with whatever waits in the buffer (for callers that did their
        own batching until the end of a loop iteration). `sink`: the reply goes to it, not to
        a new future (the sink is returned)."""
        if self.closed:
            raise rx.ConnectionError(f"Connection to Redis at {self._where} closed")
        future = self._loop.create_future() if sink is None else sink
        self._pending.append(future)
        self._queued += 1
        self._buffer.append(data)
        if now:
            self._flush()
        else:
            self._schedule(defer)
        return future

    def request_all_now(self, datas: list[bytes], sinks: list[Sink]) -> None:
        """Write these requests at once, with whatever waits in the buffer, in one write; each
        reply goes to its sink."""
        if self.closed:
            raise rx.ConnectionError(f"Connection to Redis at {self._where} closed")
        self._pending.extend(sinks)
        self._queued += len(datas)
        self._buffer.extend(datas)
        self._flush()

    def request_many(self, datas: list[bytes], defer: bool = False) -> asyncio.Future:
        if self.closed:
            raise rx.ConnectionError(f"Connection to Redis at {self._where} closed")
        future = self._loop.create_future()
        self._pending.extend([_Batch(future, len(datas))] * len(datas))
        self._queued += len(datas)
        self._buffer.extend(datas)
        self._schedule(defer)
        return future

    def _schedule(self, defer: bool) -> None:
        """Write at the end of this loop iteration; a deferred request waits up to `defer_s`
        for another one to ride with (it goes first, so its effects precede the next)."""
        if self._soon:
            return
        if not defer:
            self._soon = True
            self._loop.call_soon(self._flush)
        elif self._later is None:
            self._later = self._loop.call_later(self._defer_s, self._flush)

    def _flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        buffer = self._buffer
        if self.closed or not buffer:
            return
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._transport.write(data)
        now = self._loop.time()
        sent, answered = self._sent, self._queued - len(self._pending)
        while sent and sent[0][0] <= answered:
            sent.popleft()
        sent.append((self._queued, now))
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._timeout, self._watch)

    def _watch(self) -> None:
        """The one timer: fails everything once the oldest unanswered write is `timeout` old."""
        self._timer = None
        if self.closed:
            return
        sent, answered = self._sent, self._queued - len(self._pending)
        while sent and sent[0][0] <= answered:
            sent.popleft()
        if not sent:
            return
        due = sent[0][1] + self._timeout
        if self._loop.time() >= due:
            self._fail(rx.TimeoutError, f"Timeout reading from Redis at {self._where}")
        else:
            self._timer = self._loop.call_at(due, self._watch)

    # closing

    def _fail(self, error: type[rx.RedisError], message: str, cause: BaseException | None = None,
              graceful: bool = False) -> None:
        """Close for good: every pending call gets `error`; the client connects anew next time."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._buffer.clear()
        pending, self._pending = self._pending, deque()
        for waiter in pending:
            if not waiter.done():
                exc = error(message)
                exc.__cause__ = cause
                waiter.set_exception(exc)
        if self._transport is not None:
            if graceful:
                self._transport.close()
            else:
                self._transport.abort()
        elif not self._lost.done():
            self._lost.set_result(None)

    async def aclose(self) -> None:
        self._fail(rx.ConnectionError, "Redis client closed", graceful=True)
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(self._lost)
        except TimeoutError:
            self._transport.abort()


class RespClient:
    """One lazily opened, auto-pipelined connection to the Redis at `url`.

    Bound to the event loop that first uses it; `get_resp()` keeps one per loop.
    """

    def __init__(self, url: str, timeout: float = 2.0, defer_s: float = 0.002):
        options = parse_url(url)
        self._path: str | None = options.get("path")
        self._host: str = options.get("host") or "localhost"
        self._port: int = int(options.get("port") or 6379)
        self._tls = options.get("connection_class") is SSLConnection
        self._tls_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
        self._username: str | None = options.get("username")
        self._password: str | None = options.get("password")
        self._db = int(options.get("db") or 0)
        self._where = self._path or f"{self._host}:{self._port}"  # for messages: never the password
        self._timeout = timeout
        self._defer_s = defer_s
        # Built now, so that a wrong TLS setting in the URL fails where the client is made (at
        # start-up: the ASGI lifespan makes it), not at the first request.
        self._ssl_context = tls_context(self._tls_options) if self._tls else None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future | None = None

    def __repr__(self) -> str:
        return f"RespClient({self._where}, db={self._db})"

    async def execute(self, *args):
        """Send one command; return its reply, raise its error reply as `ResponseError`."""
        conn = self._conn or await self._connect()
        reply = await conn.request(_pack(args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def execute_many(self, commands: list[tuple], defer: bool = False) -> list:
        """Send all commands in one write; error replies come back in place, not raised."""
        if not commands:
            return []
        return await self._send_many([_pack(command) for command in commands], defer)

    async def evalsha(self, script: Script, keys: list, args: list):
        """Run one script; raise its error reply."""
        (reply,) = await self.evalsha_packed([(script, script.pack(keys, args))])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def evalsha_many(self, calls: list[tuple[Script, list, list]], defer: bool = False) -> list:
        """Run the scripts in one write; error replies come back in place, not raised."""
        return await self.evalsha_packed([(script, script.pack(keys, args)) for script, keys, args in calls], defer)

    async def evalsha_packed(self, calls: list[tuple[Script, bytes]], defer: bool = False) -> list:
        """Run packed script calls (`Script.pack`, `Script.assemble`) in one write; error replies
        come back in place, not raised.

        `defer`: the write may wait up to `defer_s` for another request to share it (work no
        client waits for: settlement, usage rows, lane reports).
        Calls of a script or function Redis lacks (NOSCRIPT, "Function not found") are retried
        once after loading it, so they run after the others in the batch.
        """
        if not calls:
            return []
        datas = [data for _, data in calls]
        replies = await self._send_many(datas, defer)
        missing = [i for i, reply in enumerate(replies) if calls[i][0].missing(reply)]
        if missing:
            scripts = {calls[i][0].sha: calls[i][0] for i in missing}
            loads = [script.load for script in scripts.values()]
            again = await self._send_many(loads + [datas[i] for i in missing])
            loaded, retried = again[:len(loads)], again[len(loads):]
            load_errors = {sha: reply for sha, reply in zip(scripts, loaded, strict=True)
                           if isinstance(reply, ResponseError)}
            for i, reply in zip(missing, retried, strict=True):
                replies[i] = load_errors.get(calls[i][0].sha, reply)
        return replies

    def send_deferred(self, command: tuple) -> None:
        """Queue one command whose reply nobody waits for (no future, no task): it rides with
        the next write, or leaves alone after `defer_s`. A failure is only logged."""
        conn = self._conn
        if conn is None or conn.closed:
            asyncio.ensure_future(self._send_alone(command))
        else:
            conn.request(_pack(command), defer=True, sink=_IGNORED)

    async def _send_alone(self, command: tuple) -> None:
        try:
            raise_errors(await self.execute_many([command]))
        except (rx.RedisError, OSError) as exc:
            log.warning("a deferred Redis command was lost: %s", exc)

    def call_now(self, script: Script, data: bytes, sink: Sink, riders: Sequence[Rider] = ()) -> None:
        """One packed script call, written at once (see `_Connection.request`), its reply (or
        error reply, or failure) handed to `sink` as soon as it is read: no future, no hop
        through the event loop. A script or function Redis lacks is loaded first, and a call
        made while (re)connecting waits for the connection, both in a task.

        `riders`: commands written right after the call, in the same write, each handed its own
        reply (an error reply or a failure included); never sent twice (a script loaded on
        demand is called again alone)."""
        conn = self._conn
        if conn is None or conn.closed:
            _to_sink(asyncio.ensure_future(self._evalsha_one(script, data, riders)), sink)
        elif riders:
            conn.request_all_now([data, *(rider.command for rider in riders)],
                                 [_Loading(self, script, data, sink), *riders])
        else:
            conn.request(data, now=True, sink=_Loading(self, script, data, sink))

    async def _evalsha_one(self, script: Script, data: bytes, riders: Sequence[Rider] = ()):
        if riders:
            try:
                replies = await self._send_many([data, *(rider.command for rider in riders)])
            except BaseException as exc:
                for rider in riders:
                    rider.set_exception(exc if isinstance(exc, Exception) else rx.ConnectionError(str(exc)))
                raise
            for rider, reply in zip(riders, replies[1:], strict=True):
                rider.set_result(reply)
            if not script.missing(replies[0]):
                return replies[0]
        (reply,) = await self.evalsha_packed([(script, data)])
        return reply

    async def aclose(self) -> None:
        if self._connecting is not None:
            try:
                await asyncio.shield(self._connecting)
            except (rx.RedisError, OSError):
                pass  # nothing to close
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    # connecting

    async def _send_many(self, datas: list[bytes], defer: bool = False) -> list:
        conn = self._conn or await self._connect()
        if len(datas) == 1:
            return [await conn.request(datas[0], defer)]
        return await conn.request_many(datas, defer)

    async def _connect(self) -> _Connection:
        """Open the connection, once for all the callers that arrive while it opens."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)  # a cancelled caller leaves it to the others

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self._timeout, self._where, self._closed, self._defer_s)
        try:
            async with asyncio.timeout(self._timeout):
                if self._path:
                    await loop.create_unix_connection(lambda: conn, self._path)
                else:
                    await loop.create_connection(
                        lambda: conn, self._host, self._port,
                        ssl=self._ssl_context if self._tls else None,
                        server_hostname=self._host if self._tls else None)
                await self._hello(conn)
        except TimeoutError:
            conn._fail(rx.TimeoutError, "connect timed out")
            raise rx.TimeoutError(f"Timeout connecting to Redis at {self._where}") from None
        except OSError as exc:
            conn._fail(rx.ConnectionError, "connect failed")
            raise rx.ConnectionError(f"Error connecting to Redis at {self._where}: {exc.strerror or exc}") from exc
        except BaseException:
            conn._fail(rx.ConnectionError, "connect failed")
            raise
        finally:
            self._connecting = None
        self._conn = conn
        return conn

    async def _hello(self, conn: _Connection) -> None:
        """AUTH and SELECT, pipelined; nothing is sent for a default user on db 0."""
        commands = []
        if self._password:
            auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
            commands.append(auth)
        if self._db:
            commands.append(("SELECT", self._db))
        if not commands:
            return
        replies = await conn.request_many([_pack(command) for command in commands])
        if self._password and isinstance(replies[0], ResponseError):
            raise rx.AuthenticationError(f"Redis at {self._where} refused AUTH: {replies[0]}")
        if isinstance(replies[-1], ResponseError):
            raise rx.ConnectionError(f"Redis at {self._where} refused SELECT {self._db}: {replies[-1]}")

    def _closed(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(options: dict) -> ssl.SSLContext:
    """The TLS context a `rediss://` URL asks for, read as redis-py reads it, so that the hot
    path connects wherever the rest of the platform does: `ssl_cert_reqs` (none, optional,
    required: the default), `ssl_ca_certs`, `ssl_ca_path`, `ssl_certfile` + `ssl_keyfile` (a
    client certificate), `ssl_check_hostname` (default: on when certificates are required)."""
    reqs = str(options.get("ssl_cert_reqs") or "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"), capath=options.get("ssl_ca_path"))
    if _CERT_REQS[reqs] == ssl.CERT_NONE:
        context.check_hostname = False
    elif options.get("ssl_check_hostname") is not None:
        context.check_hostname = bool(options["ssl_check_hostname"])
    context.verify_mode = _CERT_REQS[reqs]
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


class Sink(Protocol):
    """Where `call_now` hands a reply: called from the connection's `data_received` (or
    `_fail`), so it must not raise."""

    def done(self) -> bool: ...  # True: the reply is not wanted (dropped, the order kept)

    def set_result(self, reply) -> None: ...  # the reply, an error reply as `ResponseError`

    def set_exception(self, exc: BaseException) -> None: ...  # the call failed (no reply)


class Rider(Sink, Protocol):
    """A command that rides in another call's write (`RespClient.call_now`): packed, and a sink
    for its reply."""

    command: bytes


class _Loading:
    """A sink in front of another: a reply saying Redis lacks the script is not passed on; the
    script is loaded and the call sent again, and that reply is."""

    __slots__ = ("client", "script", "data", "sink")

    def __init__(self, client: RespClient, script: Script, data: bytes, sink: Sink):
        self.client, self.script, self.data, self.sink = client, script, data, sink

    def done(self) -> bool:
        return self.sink.done()

    def set_result(self, reply) -> None:
        if self.script.missing(reply):
            _to_sink(asyncio.ensure_future(self.client._evalsha_one(self.script, self.data)), self.sink)
        else:
            self.sink.set_result(reply)

    def set_exception(self, exc: BaseException) -> None:
        self.sink.set_exception(exc)


class _Ignored:
    """The sink of `send_deferred`: the reply is dropped, an error reply or a failure logged."""

    __slots__ = ()

    def done(self) -> bool:
        return False

    def set_result(self, reply) -> None:
        if isinstance(reply, ResponseError):
            log.warning("a deferred Redis command failed: %s", reply)

    def set_exception(self, exc: BaseException) -> None:
        log.warning("a deferred Redis command was lost: %s", exc)


_IGNORED = _Ignored()


def _to_sink(future: asyncio.Future, sink: Sink) -> None:
    """`future`'s outcome to `sink` when it is done (a cancelled one as a ConnectionError)."""

    def done(future: asyncio.Future) -> None:
        if future.cancelled():
            sink.set_exception(rx.ConnectionError("The call to Redis was cancelled"))
        elif (exc := future.exception()) is not None:
            sink.set_exception(exc)
        else:
            sink.set_result(future.result())

    future.add_done_callback(done)


class RedisPyClient(RespClient):
    """The same interface over redis-py's asyncio client (its connection pool, its hiredis
    parser): each call borrows a pooled connection, writes its packed commands in one write,
    reads their replies and gives the connection back. No write is deferred or shared between
    callers (`defer` is accepted and ignored): concurrent callers use concurrent connections.
    Chosen with GW_REDIS_CLIENT=redis-py (`get_resp`)."""

    def __init__(self, client) -> None:  # a redis.asyncio.Redis
        self._client = client
        self._pool = client.connection_pool
        self._where = repr(self._pool)
        self._tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"RedisPyClient({self._where})"

    async def execute(self, *args):
        (reply,) = await self._send_many([_pack(args)])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _send_many(self, datas: list[bytes], defer: bool = False) -> list:
        conn = await self._pool.get_connection()
        try:
            await conn.send_packed_command(datas, check_health=False)
            replies = []
            for _ in datas:
                try:
                    replies.append(await conn.read_response())
                except rx.NoScriptError as exc:  # redis-py strips the code `Script.missing` looks for
                    replies.append(ResponseError(f"NOSCRIPT {exc}"))
                except ResponseError as exc:  # an error reply: in place, as `RespClient` gives it
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()  # replies may be left unread: the connection is not reused
            raise
        finally:
            await self._pool.release(conn)

    def send_deferred(self, command: tuple) -> None:
        task = asyncio.ensure_future(self._send_alone(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def call_now(self, script: Script, data: bytes, sink: Sink, riders: Sequence[Rider] = ()) -> None:
        task = asyncio.ensure_future(self._call(script, data, sink, riders))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, script: Script, data: bytes, sink: Sink, riders: Sequence[Rider]) -> None:
        try:
            replies = await self._send_many([data, *(rider.command for rider in riders)])
            for rider, reply in zip(riders, replies[1:], strict=True):
                rider.set_result(reply)
            reply = replies[0]
            if script.missing(reply):
                (reply,) = await self.evalsha_packed([(script, data)])
        except BaseException as exc:
            failure = exc if isinstance(exc, rx.RedisError) else rx.ConnectionError(f"Redis call failed: {exc!r}")
            for rider in riders:
                rider.set_exception(failure)
            sink.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        sink.set_result(reply)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=SOCKET_TIMEOUT)
        await self._client.aclose()


_clients: dict[asyncio.AbstractEventLoop, RespClient] = {}


def get_resp() -> RespClient:
    """The hot path's client of the running event loop (a connection cannot cross loops):
    this module's (GW_REDIS_CLIENT=resp, the default) or redis-py's behind the same interface
    (GW_REDIS_CLIENT=redis-py, `RedisPyClient`)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        for old in list(_clients):
            if old.is_closed():
                _clients.pop(old, None)
        if settings.GATEWAY.get("REDIS_CLIENT", "resp") == "redis-py":
            import redis.asyncio

            # RESP2, as this module speaks it (redis-py 8 defaults to RESP3: maps as dicts)
            client = _clients[loop] = RedisPyClient(redis.asyncio.Redis.from_url(
                settings.REDIS_URL, protocol=2, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                max_connections=512))
        else:
            client = _clients[loop] = RespClient(settings.REDIS_URL, timeout=SOCKET_TIMEOUT,
                                                 defer_s=settings.GATEWAY["REDIS_DEFER_MS"] / 1000)
    return client
