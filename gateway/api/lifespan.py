"""ASGI lifespan: the runtime's start (warm what the first request would pay for) and stop (drain)."""

from __future__ import annotations

from llm_platform.runtime import Runtime


async def lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await Runtime.current().start()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await Runtime.current().stop()
            await send({"type": "lifespan.shutdown.complete"})
            return
