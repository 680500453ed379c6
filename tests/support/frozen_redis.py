"""A TCP proxy in front of the real Redis that can freeze: it keeps every connection open and
forwards nothing, the way a Redis stuck in a long command, a paused VM or a dead network path
looks to a client (no RST, no FIN, just silence). `stop()` closes everything: Redis refused."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from llm_platform.embedded import free_port


class FreezableRedisProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.frozen = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the other side never hears back
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.frozen.is_set():
                await asyncio.Event().wait()  # accept, then never answer
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    def start(self) -> FreezableRedisProxy:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", self.port))
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="frozen-redis", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    async def _close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loop.stop()

    def stop(self) -> None:
        """Close the listener and every connection: clients now see Redis refuse them."""
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        self._thread.join(5)
        self._thread = None
