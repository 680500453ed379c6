"""The usage row: one typed record per call, from the chat service to the ledger table.

Built once per request on the hot path, so it does no checking there beyond what the
dataclass constructor does for free: an unknown or missing field is a TypeError. Its JSON
(the Redis stream, the spool) is checked field by field where it is read back, in the writer,
off the hot path: `from_json` refuses an unknown field, a missing one or a value of the wrong
type, so a row is never written with a field quietly dropped.

Money is a `Decimal` here and a decimal string in JSON, never a float. `created_at` is the
wall-clock start of the call in UTC epoch seconds (the writer makes it a datetime).

A field added later must get a default: rows already in the stream or a spool file, written by
an older process, still parse. The writer checks at import that every field has a column.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

JSONValue = list[Any] | dict[str, Any]


# No slots: orjson serializes a plain dataclass through its __dict__ about 1.5 us faster per row
# (bench/usage_row.py), and an unknown or missing field still fails at construction.
@dataclass(kw_only=True)
class UsageRow:
    request_id: str
    provider_request_id: str
    created_at: float  # UTC epoch seconds
    tenant_id: int
    api_key_id: int | None
    key_prefix: str
    provider: str
    model: str  # the public name asked for
    upstream_model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_creation_tokens: int
    cost_usd: Decimal
    ttft_ms: float | None
    latency_ms: float
    finish_reason: str
    http_status: int
    error_code: str
    stream: bool
    partial: bool
    retries: int
    end_user: str
    feature: str
    front_door: str
    prompt: JSONValue | None  # the messages, only when the tenant stores content
    completion: str

    def to_json(self) -> bytes:
        return orjson.dumps(self, default=_decimal_as_string)

    @classmethod
    def from_json(cls, payload: bytes | str) -> UsageRow:
        """Parse a stream or spool entry; InvalidRow says what is wrong with it."""
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidRow(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRow(f"not a JSON object: {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRow:
        """A row from untyped values (parsed JSON, or a caller not yet moved to UsageRow),
        checked: unknown, missing or mistyped fields raise InvalidRow."""
        unknown = data.keys() - _CHECKS.keys()
        if unknown:
            raise InvalidRow(f"unknown field(s): {', '.join(sorted(unknown))}")
        missing = _REQUIRED - data.keys()
        if missing:
            raise InvalidRow(f"missing field(s): {', '.join(sorted(missing))}")
        values = {}
        for name, value in data.items():
            try:
                values[name] = _CHECKS[name](value)
            except (TypeError, ValueError, InvalidOperation) as exc:
                raise InvalidRow(f"{name}: {exc}") from None
        return cls(**values)


class InvalidRow(ValueError):
    """A usage row that does not parse into UsageRow (the message says why)."""


def _decimal_as_string(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Checks and conversions of untyped values, one per field (JSON has no Decimal, no int/float split).

def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _money(value: object) -> Decimal:
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        amount = Decimal(value)
    else:  # a float would already have lost the nano-dollars
        raise TypeError(f"expected a decimal string, got {type(value).__name__}")
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    return amount


def _json(value: object) -> JSONValue:
    if not isinstance(value, list | dict):
        raise TypeError(f"expected a JSON array or object, got {type(value).__name__}")
    return value


def _optional(check):
    return lambda value: None if value is None else check(value)


_BY_TYPE = {
    "str": _str, "int": _int, "bool": _bool, "float": _float, "Decimal": _money,
    "int | None": _optional(_int), "float | None": _optional(_float), "JSONValue | None": _optional(_json),
}
_CHECKS = {f.name: _BY_TYPE[f.type] for f in fields(UsageRow)}  # a new field's type needs a check here
_REQUIRED = frozenset(f.name for f in fields(UsageRow) if f.default is MISSING and f.default_factory is MISSING)
