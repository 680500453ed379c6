"""Run a fake upstream on loopback, in its own thread and event loop, for tests and benchmarks.

A dedicated thread lets the same server serve sync pytest tests, async tests running in
another loop, and the gateway under test, without sharing an event loop with any of them::

    with FakeOpenAI(chunks=5) as upstream:           # or FakeAnthropic
        client = openai.OpenAI(base_url=upstream.sdk_base_url, api_key="x")
        upstream.fault, upstream.fault_times = "429", 1   # the next request only
        ...
        assert upstream.requests[-1].outcome == "ok"

Faults come from ``[[fault:KIND]]`` in the last user message, the ``X-Fake-Fault`` header
(comma-separated) or the server-wide ``fault``; all that apply are combined. See ``directives``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import orjson
from aiohttp import web

from tests.support.directives import (
    NO_FAULTS,
    Directives,
    Faults,
    parse_directives,
    parse_faults,
)

FAULT_HEADER = "X-Fake-Fault"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class RecordedRequest:
    """One request as the fake received it; ``outcome`` is filled in when it ends."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    outcome: str = "pending"
    generation: int = 0  # the fake's reset count when it arrived


RECORD = web.RequestKey("fake_record", RecordedRequest)


@dataclass(frozen=True, slots=True)
class Settings:
    """The constructor's settings, restored by ``reset()``."""

    chunks: int
    delay: float
    fault: str | Sequence[str] | None
    fault_times: int | None
    api_key: str | None
    timeout_seconds: float


def new_id(prefix: str, nbytes: int = 12) -> str:
    return prefix + os.urandom(nbytes).hex()


def loads(raw: bytes) -> Any:
    """Parsed JSON, or ``None`` for a body that is not JSON."""
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


class FakeServer:
    """Base of the vendor fakes: lifecycle, request log, settings and fault selection.

    Settings (``chunks``, ``delay``, ``fault``, ``fault_times``, ``api_key``,
    ``timeout_seconds``) may be changed from any thread while the server runs.
    """

    vendor: ClassVar[str] = "fake"
    sdk_suffix: ClassVar[str] = "/v1"
    default_port: ClassVar[int] = 8001

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        chunks: int = 5,
        delay: float = 0.0,
        fault: str | Sequence[str] | None = None,
        fault_times: int | None = None,
        api_key: str | None = None,
        record: bool = True,
        timeout_seconds: float = 30.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._defaults = Settings(chunks, delay, fault, fault_times, api_key, timeout_seconds)
        self.record = record
        self._lock = threading.Lock()
        self._generation = 0
        self._requests: list[RecordedRequest] = []
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.in_flight = 0
        self._apply_defaults()

    # -- settings ---------------------------------------------------------------------------

    def _apply_defaults(self) -> None:
        d = self._defaults
        self.chunks: int = d.chunks
        self.delay: float = d.delay
        self.fault = d.fault
        self.fault_times: int | None = d.fault_times
        self.api_key: str | None = d.api_key
        self.timeout_seconds: float = d.timeout_seconds
        self.peak_in_flight = self.in_flight
        self.disconnects = 0

    @property
    def fault(self) -> str | Sequence[str] | None:
        """Server-wide fault spec(s), e.g. ``"429"`` or ``"drip:20,cut:3"``; validated on set."""
        return self._fault_spec

    @fault.setter
    def fault(self, value: str | Sequence[str] | None) -> None:
        self._server_faults = None if value is None else parse_faults(value)
        self._fault_spec = value

    def reset(self) -> None:
        """Forget recorded requests and restore the constructor's settings. A request from before
        the reset that ends after it (a hang-up the server thread notices late) counts nowhere."""
        with self._lock:
            self._requests.clear()
            self._generation += 1
        self._apply_defaults()

    # -- request log ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            return self._requests[-1]

    def _record(self, request: web.Request, body: Any, raw: bytes) -> RecordedRequest:
        # Lower-cased header names, so tests can look up "authorization" however it was sent.
        headers = {k.lower(): v for k, v in request.headers.items()} if self.record else {}
        rec = RecordedRequest(request.method, request.path, headers, body, raw, generation=self._generation)
        request[RECORD] = rec
        if self.record:
            with self._lock:
                self._requests.append(rec)
        return rec

    # -- addresses --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The API root including ``/v1``."""
        return f"{self.root_url}/v1"

    @property
    def sdk_base_url(self) -> str:
        """What the vendor's official SDK takes as ``base_url``."""
        return self.root_url + self.sdk_suffix

    # -- fault selection --------------------------------------------------------------------

    def faults_for(self, request: web.Request, directives: Directives) -> Faults:
        """Header faults + directive faults + the server-wide fault (counted down if limited)."""
        base = self._server_faults
        if base is not None and self.fault_times is not None:
            if self.fault_times <= 0:
                base = None
            else:
                self.fault_times -= 1
        header = request.headers.get(FAULT_HEADER)
        if not header and not directives.faults:
            return base if base is not None else NO_FAULTS
        specs = [*directives.faults, *(header.split(",") if header else [])]
        return (base if base is not None else NO_FAULTS).merged(specs)

    async def wait_before_answer(self, faults: Faults) -> None:
        """The server-wide delay, a slow first byte, or a hang that outlasts client timeouts."""
        wait = self.delay + faults.first_byte_ms / 1000
        if faults.timeout:
            wait += self.timeout_seconds
        if wait > 0:
            await asyncio.sleep(wait)

    @staticmethod
    def directives_in(text: str) -> Directives:
        return parse_directives(text)

    # -- streaming --------------------------------------------------------------------------

    async def send_stream(
        self,
        request: web.Request,
        events: list[bytes],
        faults: Faults,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Write SSE events; in one write unless a fault needs them paced or cut."""
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        rec: RecordedRequest = request[RECORD]
        try:
            await resp.prepare(request)
            if not faults.shapes_stream:
                await resp.write(b"".join(events))
                await resp.write_eof()
                rec.outcome = "ok"
                return resp
            for i, event in enumerate(events):
                if faults.cut_after is not None and i >= faults.cut_after:
                    self.cut(request, rec)
                    return resp
                if i and faults.drip_ms:
                    await asyncio.sleep(faults.drip_ms / 1000)
                await resp.write(event)
            await resp.write_eof()
            rec.outcome = "ok"
        except ConnectionError:
            self._client_gone(rec)
        return resp

    async def send_cut_body(
        self, request: web.Request, body: bytes, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Announce the whole body, send half of it, then hang up."""
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        rec: RecordedRequest = request[RECORD]
        try:
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            self.cut(request, rec)
        except ConnectionError:
            self._client_gone(rec)
        return resp

    @staticmethod
    def cut(request: web.Request, rec: RecordedRequest) -> None:
        """Close the connection after flushing what was written, with no proper end."""
        rec.outcome = "cut"
        if request.transport is not None:
            request.transport.close()

    def _client_gone(self, rec: RecordedRequest) -> None:
        if rec.outcome == "pending":
            rec.outcome = "cancelled" if self._stopping else "disconnected"
            if not self._stopping and rec.generation == self._generation:
                self.disconnects += 1

    # -- app and lifecycle ------------------------------------------------------------------

    def routes(self) -> Iterable[web.RouteDef]:
        raise NotImplementedError

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._track], client_max_size=64 * 1024**2)
        app.add_routes(list(self.routes()))
        return app

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count concurrency, remember the task for shutdown, and note hang-ups."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            if (rec := request.get(RECORD)) is not None:
                self._client_gone(rec)
            raise
        finally:
            self.in_flight -= 1
            if task is not None:
                self._tasks.discard(task)
        rec = request.get(RECORD)
        if rec is not None and rec.outcome == "pending":
            rec.outcome = "ok" if resp.status < 400 else f"status:{resp.status}"
        return resp

    async def open(self) -> None:
        """Bind and start serving in the running loop."""
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=0.5,
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
            await web.SockSite(runner, sock, backlog=1024).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._port = sock.getsockname()[1]
        self._runner = runner

    async def close(self) -> None:
        """Stop serving; handlers still sleeping (``timeout``, ``delay``) are cancelled."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> Self:
        """Serve from a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready, failure), name=f"fake-{self.vendor}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"fake {self.vendor} did not start")
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.open())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.close())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop the server thread; safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- CLI --------------------------------------------------------------------------------

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> None:
        """``python -m tests.support.fake_<vendor> --port N --chunks N --delay S [--fault SPEC]``."""
        parser = argparse.ArgumentParser(description=f"Fake {cls.vendor} upstream server")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=cls.default_port)
        parser.add_argument("--chunks", type=int, default=5)
        parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
        parser.add_argument("--fault", default=None, help="server-wide fault, e.g. 429 or drip:20")
        parser.add_argument("--api-key", default=None, help="refuse other keys with 401")
        parser.add_argument("--record", action="store_true", help="keep every request in memory")
        parser.add_argument("--no-uvloop", action="store_true")
        args = parser.parse_args(argv)
        server = cls(
            host=args.host,
            port=args.port,
            chunks=args.chunks,
            delay=args.delay,
            fault=args.fault,
            api_key=args.api_key,
            record=args.record,
        )

        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await server.open()
            print(f"fake {cls.vendor} listening on {server.sdk_base_url}", flush=True)
            try:
                await stop.wait()
            finally:
                await server.close()

        runner: Callable[[Awaitable[None]], None] = asyncio.run  # type: ignore[assignment]
        if not args.no_uvloop:
            with contextlib.suppress(ImportError):
                import uvloop

                runner = uvloop.run  # type: ignore[assignment]
        with contextlib.suppress(KeyboardInterrupt):
            runner(serve())
