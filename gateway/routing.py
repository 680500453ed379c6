"""The route table: a per-process snapshot of ModelRoute/Lane, refreshed every few seconds.

The hot path reads the snapshot (a dict lookup); PostgreSQL is read only on refresh, off the
request's critical path except for the very first request of a process.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.conf import settings

from .lane_policy import parse_policy
from .models import Lane, ModelRoute


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
        self._refreshing: asyncio.Future | None = None

    async def snapshot(self) -> dict[str, Route]:
        if self._table is not None and time.monotonic() < self._expires:
            return self._table
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        if self._table is None:
            return await self._refreshing
        return self._table  # serve the previous snapshot while one refresh runs

    async def _refresh(self) -> dict[str, Route]:
        table = await sync_to_async(load_table, thread_sensitive=False)()
        self._table = table
        self._expires = time.monotonic() + settings.GATEWAY["LOCAL_CACHE_SECONDS"]
        return table

    def invalidate(self) -> None:
        self._expires = 0.0


routes = RouteTable()
