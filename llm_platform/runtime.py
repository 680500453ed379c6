"""The runtime: one event loop's shared clients and background work, with an explicit start and stop.

    runtime = Runtime.current()      # the running loop's (created on first use)
    await runtime.start()            # the ASGI lifespan, a Celery worker's loop, a test
    ...
    await runtime.stop()             # drain settlements, give leases back, flush, close clients

Provider sessions, the Redis clients, the limits batcher and the usage recorder's spool are
bound to the loop they were made on (a connection cannot cross loops): they hang off the
runtime of that loop, found by the loop object itself (never by `id(loop)`, which a later loop
may reuse). The ASGI lifespan, a Channels consumer (same loop as HTTP) and a Celery worker use
it the same way. A loop that never called `start` still works: clients are made on first use;
`start` only warms them and starts the background work, `stop` drains and closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import weakref

log = logging.getLogger("llm_platform.runtime")
REAP_EVERY_S = 5
PURGE_EVERY_S = 3600


class Runtime:
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.providers: dict[tuple, object] = {}  # (kind, base URL, credential) -> adapter
        self.active: set = set()  # the cancel tokens of calls in flight (ended at shutdown)
        self.journal = None  # this loop's admitted calls (gateway/chat/journal.py `Journal`)
        self.started = False
        self._background: list[asyncio.Task] = []
        self._stream_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def current(cls) -> Runtime:
        loop = asyncio.get_running_loop()
        runtime = cls._by_loop.get(loop)
        if runtime is None:
            runtime = cls._by_loop[loop] = cls(loop)
        return runtime

    # -- start --------------------------------------------------------------------------------

    async def start(self, serve_http: bool = True) -> None:
        """Warm what the first request would otherwise pay for and start the background work."""
        if self.started:
            return
        self.started = True
        from asgiref.sync import sync_to_async

        from gateway.providers.base import _factory
        from gateway.routing import routes
        from gateway.tokens import encoding, encoding_name_for
        from llm_platform.resp import get_resp

        get_resp()  # this loop's Redis client: a wrong REDIS_URL setting stops the start here
        self._background.append(asyncio.ensure_future(self._flush_forever()))
        await sync_to_async(encoding, thread_sensitive=False)("o200k_base")
        try:
            table = await routes.snapshot()
        except Exception:  # the database may come up after us; the first request retries
            log.warning("route table not loaded at startup; will retry on first request")
            table = {}
        # Import the adapters the routes use now, not inside the first request (the Anthropic SDK
        # takes ~2 s to import, blocking the event loop); likewise their tokenizers (~0.5 s each).
        lanes = [lane for route in table.values() for lane in route.lanes]
        for kind in {lane.provider for lane in lanes}:
            await sync_to_async(_factory, thread_sensitive=False)(kind)
        for name in {encoding_name_for(lane.upstream_model) for lane in lanes}:
            await sync_to_async(encoding, thread_sensitive=False)(name)
        if serve_http:
            self._hook_sigterm()
        # Everything loaded so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise walk ~130k objects and pause every request for ~100 ms.
        gc.collect()
        gc.freeze()

    async def _flush_forever(self) -> None:
        from billing.recorder import flush_pending

        seconds = 0
        while True:
            await asyncio.sleep(1.0)
            await flush_pending()
            if seconds % 60 == 0:  # soon after start, then once a minute
                await self._prune_functions()
            if seconds % REAP_EVERY_S == 0:
                await self._reap_lost_calls()
            if seconds % PURGE_EVERY_S == 0:
                await self._purge_responses()
            seconds += 1

    @staticmethod
    async def _purge_responses() -> None:
        """Delete stored Responses API responses past their retention (any process may)."""
        from gateway.frontdoors.openai_responses import purge_expired
        from llm_platform.db import orm

        try:
            await orm(purge_expired)
        except Exception as exc:  # noqa: BLE001 - PostgreSQL away or slow: the next hour tries again
            log.warning("could not purge expired stored responses: %s", exc)

    @staticmethod
    async def _reap_lost_calls() -> None:
        """Bill the calls of processes that died mid-call (gateway/chat/journal.py)."""
        from gateway.chat import journal

        try:
            await journal.reap()
        except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
            log.warning("could not reap lost calls: %s", exc)

    @staticmethod
    async def _prune_functions() -> None:
        """Mark the Redis function libraries this process uses; delete versions no process has
        used for GW_FUNCTION_IDLE_SECONDS (`scripts.prune_functions`)."""
        from django.conf import settings

        from gateway.limits import LIMITS
        from gateway.scripts import prune_functions

        try:
            await prune_functions([LIMITS], settings.GATEWAY["FUNCTION_IDLE_SECONDS"])
        except Exception as exc:  # noqa: BLE001 - Redis away or busy: the next minute tries again
            log.warning("could not prune old Redis function libraries: %s", exc)

    # -- a deploy: end long streams before the server cuts them ----------------------------------

    def _hook_sigterm(self) -> None:
        """When the server is told to stop (SIGTERM, SIGINT), calls still running after
        GW_SHUTDOWN_GRACE_SECONDS are ended by the platform: a stream's last event is then a
        retryable `server_shutdown` error (with its `id:`, so it can be resumed elsewhere) and its
        row says the server ended it, instead of being cut silently when the server gives up."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if getattr(previous, "_gw_runtime", False):
                continue

            def handler(number, frame, previous=previous) -> None:
                self.loop.call_soon_threadsafe(self.shutting_down)
                if callable(previous):
                    previous(number, frame)

            handler._gw_runtime = True
            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread: the server handles signals elsewhere
                return

    def shutting_down(self) -> None:
        from django.conf import settings

        if self._stream_deadline is None:
            grace = settings.GATEWAY["SHUTDOWN_GRACE_SECONDS"]
            self._stream_deadline = self.loop.call_later(grace, self.end_calls)

    def end_calls(self) -> None:
        from gateway.chat.cancel import SHUTDOWN

        for token in list(self.active):
            token.cancel(SHUTDOWN)

    # -- stop ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain settlements, give leases back, flush counters and rows, close the clients."""
        from billing.recorder import flush_pending
        from gateway.chat import drain_settling
        from gateway.limits import give_back_leases
        from gateway.providers.base import close_all
        from gateway.resilience import flush_successes_now

        self.end_calls()
        await drain_settling()
        await give_back_leases()
        await flush_successes_now()
        if self.journal is not None and self.journal.beat is not None:
            self.journal.beat.cancel()
        for task in self._background:
            task.cancel()
        self._background.clear()
        await flush_pending()
        await close_all()
        from llm_platform.db import close_connections

        await asyncio.get_running_loop().run_in_executor(None, close_connections)
        self.started = False
