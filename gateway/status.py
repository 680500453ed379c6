"""What operators see on /status: each lane's configuration and whether its host answers."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from .models import Lane
from .providers.base import default_base_url


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=1.0):
            return True
    except OSError:
        return False


def _breaker(lane: Lane) -> dict:
    """The lane's shared breaker state, read straight from Redis."""
    from llm_platform.redis import get_redis

    from .resilience import _keys
    from .routing import _lane_spec

    keys = _keys(_lane_spec(lane, lane.route.model))
    client = get_redis()
    state = {k.decode(): v.decode() for k, v in client.hgetall(keys["breaker"]).items()}
    return {"state": state.get("state", "closed"), "reason": state.get("reason", ""),
            "held_ms": max(client.pttl(keys["hold"]), 0)}


def lane_status() -> list[dict]:
    results = []
    probed: dict[str, bool] = {}
    for lane in Lane.objects.select_related("route").order_by("route__model", "position"):
        base_url = lane.base_url or default_base_url(lane.provider)
        configured = not lane.api_key_env or bool(os.environ.get(lane.api_key_env))
        if lane.provider == "local":
            reachable = True
        else:
            if base_url not in probed:
                probed[base_url] = _reachable(base_url)
            reachable = probed[base_url]
        results.append({
            "model": lane.route.model,
            "position": lane.position,
            "provider": lane.provider,
            "upstream_model": lane.upstream_model,
            "base_url": base_url or None,
            "credential_env": lane.api_key_env or None,
            "configured": configured,
            "reachable": reachable,
            "breaker": _breaker(lane),
        })
    return results
