"""ORM work from async code: in a thread of our own, bounded in time, with stale connections closed.

Django closes broken and old connections around each request (the request_started/finished
signals call `close_old_connections`). Code on the async hot path that reads the database off
the event loop gets no request signals, so its threads would keep a connection that died with a
PostgreSQL restart and fail forever after. `orm()` does what the signals do, before and after each
call, and turns "the database is away" into one client-facing error, `DatabaseUnavailable`
(503 with Retry-After), instead of a 500.

A PostgreSQL that accepts connections but answers nothing (a hung host, a stopped process)
would hold a thread for as long as TCP lets it. `orm()` waits at most `DATABASE_CALL_TIMEOUT`
seconds, then shuts the thread's socket down so that libpq returns at once; if Django then
reconnects within the same call (its health check failed), the connect timeout bounds that. So
a thread is held at most DATABASE_CALL_TIMEOUT + the connect timeout, and a call waits at most
DATABASE_CALL_TIMEOUT, queueing included. The statement timeout (settings.DATABASES OPTIONS)
bounds a slow query on the server's side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connections

from gateway.errors import GatewayError

log = logging.getLogger("llm_platform.db")
T = TypeVar("T")

# Threads (and so PostgreSQL connections) per process for hot-path ORM reads: key lookups on a
# cache miss and route-table refreshes, both rare. A call waits in line for a thread within its
# time bound.
THREADS = 8
RETRY_AFTER_SECONDS = 2

_executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="orm")


class DatabaseUnavailable(GatewayError):
    """PostgreSQL is down, restarting or not answering: retry shortly (503 + Retry-After)."""

    def __init__(self, message: str = "The platform's database is unreachable; retry shortly.") -> None:
        super().__init__(503, message, type="server_error", code="database_unavailable",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class _Call:
    """Which connection a call's thread is using, so that a call past its bound can cut it."""

    __slots__ = ("lock", "wrapper")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wrapper = None

    def cut(self) -> None:
        """Shut down the socket of a connection stuck waiting for PostgreSQL: libpq sees the
        connection end and the thread returns with an OperationalError."""
        with self.lock:
            raw = getattr(self.wrapper, "connection", None)
            if raw is None:
                return  # still connecting: the connect timeout bounds it
            try:
                fd = os.dup(raw.pgconn.socket)
            except Exception:  # noqa: BLE001 - already closed: nothing to cut
                return
        with socket.socket(fileno=fd) as sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already shut


def _run(call: _Call, fn: Callable[..., T], args: tuple) -> T:
    with call.lock:
        call.wrapper = connections["default"]
    try:
        close_old_connections()  # what request_started does: drop a broken or too old connection
        return fn(*args)
    finally:
        with call.lock:
            call.wrapper = None
        close_old_connections()  # what request_finished does


async def orm(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in an ORM thread; DatabaseUnavailable if PostgreSQL fails or takes too long."""
    bound = settings.DATABASE_CALL_TIMEOUT
    call = _Call()
    future = asyncio.get_running_loop().run_in_executor(_executor, _run, call, fn, args)
    try:
        return await asyncio.wait_for(future, bound)
    except TimeoutError:
        call.cut()
        log.warning("PostgreSQL did not answer within %.1f s (%s)", bound, getattr(fn, "__qualname__", fn))
        raise DatabaseUnavailable("The platform's database is not answering; retry shortly.") from None
    except (OperationalError, InterfaceError) as exc:
        log.warning("PostgreSQL unavailable (%s): %s", getattr(fn, "__qualname__", fn), type(exc).__name__)
        raise DatabaseUnavailable() from None


def close_connections(wait_s: float = 5.0) -> None:
    """Close every ORM thread's connection (a process stopping; a test dropping its database).

    One task per thread, each held at a barrier until all have run, so that no thread runs two."""
    barrier = threading.Barrier(THREADS)

    def close() -> None:
        connections.close_all()
        try:
            barrier.wait(timeout=wait_s)
        except threading.BrokenBarrierError:
            pass  # a thread stuck on a hung PostgreSQL: its call's cut frees it

    for future in [_executor.submit(close) for _ in range(THREADS)]:
        future.result()
