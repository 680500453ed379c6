"""The usage row's cost on the hot path, per row, with timeit (no services needed):

- today: the dict `ChatCall.row` builds (cost formatted with `str`), `orjson.dumps(row, default=str)`;
- UsageRow: `UsageRow(**fields).to_json()` (billing/ledger.py: a slots dataclass);
- the same record without slots, for the trade-off: orjson reads a plain dataclass's `__dict__`
  directly, but a slots one attribute by attribute; slots refuse a misspelt attribute at once.

    .venv/bin/python bench/usage_row.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
import timeit
from decimal import Decimal
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billing.ledger import UsageRow  # noqa: E402

NUMBER, REPEAT = 100_000, 9
PlainRow = dataclasses.make_dataclass(
    "PlainRow", [(f.name, f.type) for f in dataclasses.fields(UsageRow)], kw_only=True,
    namespace={"to_json": UsageRow.to_json})


def fields(store_content: bool) -> dict:
    """What `ChatCall.row` builds for a streamed call, its prompt and completion kept or not."""
    return {
        "request_id": "req_0123456789abcdef0123456789abcdef", "provider_request_id": "chatcmpl-abc123",
        "created_at": time.time(), "tenant_id": 42, "api_key_id": 4242, "key_prefix": "sk-gw-ab12",
        "provider": "openai-compatible", "model": "bench", "upstream_model": "gpt-4o-mini",
        "prompt_tokens": 12, "completion_tokens": 34, "cached_tokens": 0, "cache_creation_tokens": 0,
        "cost_usd": Decimal("0.0000222"), "ttft_ms": 1.234, "latency_ms": 5.678, "finish_reason": "stop",
        "http_status": 200, "error_code": "", "stream": True, "partial": False, "retries": 0,
        "end_user": "", "feature": "", "front_door": "rest",
        "prompt": [{"role": "user", "content": "hello benchmark"}] if store_content else None,
        "completion": "Hello! How can I help you today?" if store_content else "",
    }


def per_row_us(statement: str, namespace: dict) -> float:
    best = min(timeit.repeat(statement, globals=namespace, number=NUMBER, repeat=REPEAT))
    return best / NUMBER * 1e6


def main() -> None:
    print(f"best of {REPEAT} x {NUMBER:,} rows; Python {sys.version.split()[0]}, orjson {orjson.__version__}")
    print(f"{'content':<9}{'dict today':>12}{'UsageRow':>10}{'+ us':>7}{'no slots':>10}{'+ us':>7}")
    for store in (False, True):
        row = fields(store)
        rest = {k: v for k, v in row.items() if k != "cost_usd"}
        ns = {"orjson": orjson, "UsageRow": UsageRow, "PlainRow": PlainRow, "row": row, "rest": rest,
              "cost": row["cost_usd"]}
        before = per_row_us("orjson.dumps(dict(**rest, cost_usd=str(cost)), default=str)", ns)
        after = per_row_us("UsageRow(**row).to_json()", ns)
        plain = per_row_us("PlainRow(**row).to_json()", ns)
        print(f"{'stored' if store else 'none':<9}{before:>10.2f}us{after:>8.2f}us{after - before:>+7.2f}"
              f"{plain:>8.2f}us{plain - before:>+7.2f}")


if __name__ == "__main__":
    main()
