"""Parse and validate a routes file (YAML or JSON), naming the line and field of any mistake."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import urlparse

import yaml

from .lane_policy import PolicyError, parse_policy

PROVIDER_KINDS = {"openai", "anthropic", "openai-compatible", "local"}
ROUTE_KEYS = {"model", "lanes", "description"}
POLICY_KEYS = {"timeouts", "retry", "breaker", "limits"}
LANE_KEYS = {"provider", "upstream_model", "base_url", "api_key_env", "context_window", "prices", "options"} | POLICY_KEYS
PRICE_KEYS = {"input", "output", "cached_input"}
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*$")
LINE = "__line__"


class RoutesFileError(ValueError):
    pass


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep=deep)
        mapping[LINE] = node.start_mark.line + 1
        return mapping


@dataclass
class LaneData:
    provider: str
    upstream_model: str
    base_url: str
    api_key_env: str
    context_window: int
    price_input: Decimal
    price_output: Decimal
    price_cached_input: Decimal
    options: dict


@dataclass
class RouteData:
    model: str
    description: str
    lanes: list[LaneData]


def _fail(where: str, line: int | None, message: str) -> RoutesFileError:
    return RoutesFileError(f"line {line}: {where}: {message}" if line else f"{where}: {message}")


def _price(value, where: str, line: int | None) -> Decimal:
    try:
        price = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise _fail(where, line, f"{value!r} is not a decimal number") from None
    if not price.is_finite() or price < 0:
        raise _fail(where, line, "must be a non-negative number")
    return price


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != LINE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _lane(raw, where: str) -> LaneData:
    if not isinstance(raw, dict):
        raise _fail(where, None, "each lane must be a mapping")
    line = raw.get(LINE)
    unknown = set(raw) - LANE_KEYS - {LINE}
    if unknown:
        raise _fail(f"{where}.{sorted(unknown)[0]}", line, f"unknown field (known: {', '.join(sorted(LANE_KEYS))})")
    provider = raw.get("provider")
    if provider not in PROVIDER_KINDS:
        raise _fail(f"{where}.provider", line, f"must be one of {', '.join(sorted(PROVIDER_KINDS))}, got {provider!r}")
    upstream = raw.get("upstream_model")
    if not isinstance(upstream, str) or not upstream.strip():
        raise _fail(f"{where}.upstream_model", line, "is required (a non-empty string)")
    base_url = raw.get("base_url") or ""
    if base_url:
        parsed = urlparse(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise _fail(f"{where}.base_url", line, f"{base_url!r} is not an http(s) URL")
    if provider == "openai-compatible" and not base_url:
        raise _fail(f"{where}.base_url", line, "is required for an openai-compatible lane")
    env = raw.get("api_key_env") or ""
    if env and not _ENV.match(str(env)):
        raise _fail(f"{where}.api_key_env", line, f"{env!r} is not an environment variable name (e.g. OPENAI_API_KEY)")
    window = raw.get("context_window", 128_000)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise _fail(f"{where}.context_window", line, "must be a positive integer")
    prices = raw.get("prices") or {}
    if not isinstance(prices, dict):
        raise _fail(f"{where}.prices", line, "must be a mapping of input/output/cached_input")
    unknown = set(prices) - PRICE_KEYS - {LINE}
    if unknown:
        raise _fail(f"{where}.prices.{sorted(unknown)[0]}", prices.get(LINE, line), "unknown price (known: input, output, cached_input)")
    price_line = prices.get(LINE, line)
    price_input = _price(prices.get("input", 0), f"{where}.prices.input", price_line)
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise _fail(f"{where}.options", line, "must be a mapping")
    options = dict(options)
    for key in POLICY_KEYS & set(raw):
        options[key] = raw[key]
    try:
        parse_policy(options, where)
    except PolicyError as exc:
        raise _fail(str(exc).split(":")[0], line, str(exc).split(": ", 1)[1]) from None
    return LaneData(
        provider=provider,
        upstream_model=upstream.strip(),
        base_url=str(base_url),
        api_key_env=str(env),
        context_window=window,
        price_input=price_input,
        price_output=_price(prices.get("output", 0), f"{where}.prices.output", price_line),
        price_cached_input=_price(prices.get("cached_input", price_input), f"{where}.prices.cached_input", price_line),
        options=_strip(options),
    )


def parse_routes(text: str) -> list[RouteData]:
    try:
        document = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RoutesFileError(f"line {mark.line + 1}: not valid YAML/JSON: {getattr(exc, 'problem', exc)}" if mark else f"not valid YAML/JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("routes"), list):
        raise RoutesFileError("the file must be a mapping with a 'routes' list")
    routes, seen = [], {}
    for i, raw in enumerate(document["routes"]):
        where = f"routes[{i}]"
        if not isinstance(raw, dict):
            raise _fail(where, None, "each route must be a mapping")
        line = raw.get(LINE)
        unknown = set(raw) - ROUTE_KEYS - {LINE}
        if unknown:
            raise _fail(f"{where}.{sorted(unknown)[0]}", line, f"unknown field (known: {', '.join(sorted(ROUTE_KEYS))})")
        model = raw.get("model")
        if not isinstance(model, str) or not model.strip() or len(model) > 200:
            raise _fail(f"{where}.model", line, "is required (a non-empty string)")
        if model in seen:
            raise _fail(f"{where}.model", line, f"{model!r} is already defined on line {seen[model]}")
        seen[model] = line
        lanes = raw.get("lanes")
        if not isinstance(lanes, list) or not lanes:
            raise _fail(f"{where}.lanes", line, "needs at least one lane")
        routes.append(RouteData(
            model=model.strip(),
            description=str(raw.get("description") or ""),
            lanes=[_lane(lane, f"{where}.lanes[{j}]") for j, lane in enumerate(lanes)],
        ))
    return routes
