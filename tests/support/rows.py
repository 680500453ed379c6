"""Whole usage rows for tests (billing.ledger.UsageRow refuses a partial one)."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal


def fields(**changes) -> dict:
    """A whole row with no field at its column's default, so a field lost on the way shows."""
    return {
        "request_id": f"ledger-{uuid.uuid4().hex}", "provider_request_id": "chatcmpl-up-7",
        "created_at": time.time(), "tenant_id": 1, "api_key_id": None, "key_prefix": "sk-gw-ab12",
        "provider": "openai-compatible", "model": "public-name", "upstream_model": "gpt-4o-mini-2024",
        "prompt_tokens": 1_000_003, "completion_tokens": 333, "cached_tokens": 1000, "cache_creation_tokens": 7,
        "cost_usd": Decimal("0.150425783"),  # to the nano-dollar
        "ttft_ms": 12.345, "latency_ms": 678.901, "finish_reason": "length", "http_status": 499,
        "error_code": "client_disconnected", "stream": True, "partial": True, "retries": 2,
        "end_user": "user-ß-42", "feature": "summarize", "front_door": "websocket",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo \u2603"}],
        "completion": "Bonjour \u2603, line one\nline two",
        **changes,
    }


def usage_row(**changes):
    from billing.ledger import UsageRow

    return UsageRow(**fields(**changes))
