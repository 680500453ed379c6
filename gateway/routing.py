"""The route table: a per-process snapshot of ModelRoute/Lane, refreshed every few seconds.

The hot path reads the snapshot (a dict lookup); PostgreSQL is read only on refresh, off the
request's critical path except for the very first request of a process. While PostgreSQL is
away, the last good snapshot keeps serving for up to `DATABASE_STALE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings

from llm_platform.db import DatabaseUnavailable, orm

from .lane_policy import parse_policy
from .models import Lane, ModelRoute

log = logging.getLogger("gateway.routing")


@dataclass(frozen=True, slots=True)
class LaneSpec:
    id: int
    route_model: str
    position: int
    provider: str
    upstream_model: str
    base_url: str
    api_key_env: str
    context_window: int
    price_input: Decimal
    price_output: Decimal
    price_cached_input: Decimal
    options: dict = field(default_factory=dict, hash=False, compare=False)
    policy: object = field(default=None, hash=False, compare=False)  # lane_policy.LanePolicy

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.upstream_model}@{self.base_url or 'default'}"


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    lanes: tuple[LaneSpec, ...]
    owned_by: str
    created: int


def _lane_spec(lane: Lane, model: str) -> LaneSpec:
    return LaneSpec(
        id=lane.pk,
        route_model=model,
        position=lane.position,
        provider=lane.provider,
        upstream_model=lane.upstream_model,
        base_url=lane.base_url,
        api_key_env=lane.api_key_env,
        context_window=lane.context_window,
        price_input=lane.price_input,
        price_output=lane.price_output,
        price_cached_input=lane.price_cached_input,
        options=dict(lane.options or {}),
        policy=parse_policy(lane.options or {}),
    )


def load_table() -> dict[str, Route]:
    table = {}
    for route in ModelRoute.objects.filter(is_enabled=True).prefetch_related("lanes"):
        lanes = tuple(_lane_spec(lane, route.model) for lane in route.lanes.all())
        if not lanes:
            continue
        owned_by = "llm-platform (built-in)" if lanes[0].provider == "local" else lanes[0].provider
        table[route.model] = Route(route.model, lanes, owned_by, int(route.updated_at.timestamp()))
    return table


class RouteTable:
    def __init__(self) -> None:
        self._table: dict[str, Route] | None = None
        self._expires = 0.0
        self._loaded_at = 0.0  # when the snapshot was read from PostgreSQL (monotonic)
        self._refreshing: asyncio.Future | None = None

    async def snapshot(self) -> dict[str, Route]:
        now = time.monotonic()
        if self._table is not None and now < self._expires:
            return self._table
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(_retrieve)
        if self._table is None or now - self._loaded_at > settings.DATABASE_STALE_SECONDS:
            return await asyncio.shield(self._refreshing)
        return self._table  # serve the previous snapshot while one refresh runs (or fails)

    async def _refresh(self) -> dict[str, Route]:
        try:
            table = await orm(load_table)
        except DatabaseUnavailable:
            if self._table is not None:  # keep serving the last good copy; try again in a second
                self._expires = time.monotonic() + 1.0
            raise
        self._table = table
        self._loaded_at = time.monotonic()
        self._expires = self._loaded_at + settings.GATEWAY["LOCAL_CACHE_SECONDS"]
        return table

    def invalidate(self) -> None:
        self._expires = 0.0


def _retrieve(future: asyncio.Future) -> None:
    """A refresh nobody awaited failed: the next snapshot() tries again (already logged)."""
    if not future.cancelled():
        exc = future.exception()
        if exc is not None and not isinstance(exc, DatabaseUnavailable):
            log.error("route table refresh failed", exc_info=exc)


routes = RouteTable()
