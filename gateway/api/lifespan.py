"""ASGI lifespan: warm what the first request would otherwise pay for; drain on shutdown."""

from __future__ import annotations

import logging

log = logging.getLogger("gateway.lifespan")


_flusher = None


async def _flush_forever() -> None:
    import asyncio

    from billing.recorder import flush_pending

    seconds = 0
    while True:
        await asyncio.sleep(1.0)
        await flush_pending()
        if seconds % 60 == 0:  # soon after start, then once a minute
            await _prune_functions()
        seconds += 1


async def _prune_functions() -> None:
    """Mark the Redis function libraries this process uses; delete versions no process has
    used for GW_FUNCTION_IDLE_SECONDS (`scripts.prune_functions`)."""
    from django.conf import settings

    from ..limits import LIMITS
    from ..scripts import prune_functions

    try:
        await prune_functions([LIMITS], settings.GATEWAY["FUNCTION_IDLE_SECONDS"])
    except Exception as exc:  # noqa: BLE001 - Redis away or busy: the next minute tries again
        log.warning("could not prune old Redis function libraries: %s", exc)


async def startup() -> None:
    import asyncio

    global _flusher
    from llm_platform.resp import get_resp

    get_resp()  # this loop's Redis client: a wrong REDIS_URL setting stops the start here
    _flusher = asyncio.ensure_future(_flush_forever())
    from asgiref.sync import sync_to_async

    from ..routing import routes
    from ..tokens import encoding

    await sync_to_async(encoding, thread_sensitive=False)("o200k_base")
    try:
        table = await routes.snapshot()
    except Exception:  # the database may come up after us; the first request retries
        log.warning("route table not loaded at startup; will retry on first request")
        table = {}
    # Import the adapters the routes use now, not inside the first request (the Anthropic SDK
    # takes ~2 s to import, blocking the event loop).
    from ..providers.base import _factory

    lanes = [lane for route in table.values() for lane in route.lanes]
    for kind in {lane.provider for lane in lanes}:
        await sync_to_async(_factory, thread_sensitive=False)(kind)
    # Likewise the tokenizers the routes' models count with (loading one takes ~0.5 s).
    from ..tokens import encoding_name_for

    for name in {encoding_name_for(lane.upstream_model) for lane in lanes}:
        await sync_to_async(encoding, thread_sensitive=False)(name)
    import gc

    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise walk ~130k objects and pause every request for ~100 ms.
    gc.collect()
    gc.freeze()


async def shutdown() -> None:
    from ..providers.base import close_all
    from ..service import drain_settling

    await drain_settling()
    from ..limits import give_back_leases

    await give_back_leases()
    from ..resilience import flush_successes_now

    await flush_successes_now()
    if _flusher is not None:
        _flusher.cancel()
    from billing.recorder import flush_pending

    await flush_pending()
    await close_all()


async def lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
