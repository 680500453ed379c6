"""Shared Redis clients: one connection pool per process (per event loop for asyncio)."""

from __future__ import annotations

import asyncio
import threading
import weakref

import redis
import redis.asyncio as aioredis
from django.conf import settings

_sync_client: redis.Redis | None = None
# By the loop object, not id(loop): a later loop may reuse a dead one's id, and get its client.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

SOCKET_TIMEOUT = 2.0  # a Redis that stops answering must fail fast, not hang the request
MAX_CONNECTIONS = 512  # per process and event loop (asyncio client)
POOL_TIMEOUT = 1.0  # a command waits this long for a free connection when all are busy


def get_redis() -> redis.Redis:
    global _sync_client
    if _sync_client is None:
        with _lock:
            if _sync_client is None:
                _sync_client = redis.Redis.from_url(
                    settings.REDIS_URL,
                    socket_timeout=SOCKET_TIMEOUT,
                    socket_connect_timeout=SOCKET_TIMEOUT,
                    health_check_interval=30,
                )
    return _sync_client


def get_async_redis() -> aioredis.Redis:
    """The asyncio client bound to the running loop (clients cannot cross event loops)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        # Blocking pool: past max_connections a command waits (up to POOL_TIMEOUT) for a
        # connection to come back instead of failing at once with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            health_check_interval=30,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_TIMEOUT,
        )
        client = aioredis.Redis(connection_pool=pool)
        _async_clients[loop] = client
    return client


def move_stream_to_table(stream: str, model, to_row, count: int = 500) -> int:
    """Copy a batch of a Redis stream's entries into `model` rows, then delete them.

    `to_row(entry_id, fields)` builds an unsaved row; the table's unique constraint makes a
    batch copied twice (a crash between insert and delete) harmless.
    """
    client = get_redis()
    entries = client.xrange(stream, count=count)
    if not entries:
        return 0
    rows = [to_row(entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for entry_id, fields in entries]
    model.objects.bulk_create(rows, ignore_conflicts=True)
    client.xdel(stream, *(entry_id for entry_id, _ in entries))
    return len(entries)
