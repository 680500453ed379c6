"""No request body, however malformed or deeply nested, gets a 5xx (issue 20, point 3).

Property-based: Hypothesis builds valid chat request bodies, then mutates them (a wrong type at
any path, null, numbers huge and negative, huge and unicode strings, lists and objects, nesting
up to ~400 levels, fields removed or added) and checks two layers:

- the boundary and the pre-flight called directly (parse, validate, fingerprint, count tokens,
  check the schema, size the reservation, build each provider's request): many thousands of
  cases, in memory;
- the running ASGI server over HTTP, against the built-in `local` model and a fake
  OpenAI-compatible upstream, with and without `Idempotency-Key` and `stream`.

Every refusal must be a 4xx in OpenAI's error shape, and a 400 must name its `param` (only a
body that is not a JSON object at all has none to name). The runs are derandomized, so CI sees
the same cases each time. For a longer or different search, set:

    GW_FUZZ_CASES=50000 GW_FUZZ_HTTP_CASES=5000 GW_FUZZ_SEED=7 python -m llm_platform.testrun tests/gateway/test_fuzz.py
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gateway.api.validation import parse_json, validate_chat
from gateway.chat.call import CallContext, ChatCall
from gateway.errors import GatewayError
from gateway.idempotency import fingerprint
from gateway.providers.anthropic import to_anthropic
from gateway.providers.local import LocalProvider
from gateway.providers.openai import build_body
from gateway.routing import LaneSpec, Route
from tenants.principal import Principal
from tests.conftest import schema

ERRORS = jsonschema.Draft202012Validator(schema("openai.ErrorResponse"))  # built once: thousands of checks
CASES = int(os.environ.get("GW_FUZZ_CASES", "4000"))
HTTP_CASES = int(os.environ.get("GW_FUZZ_HTTP_CASES", "1200"))  # over the four HTTP variants
SEED = os.environ.get("GW_FUZZ_SEED")


def fuzz_settings(cases: int, *extra_checks: HealthCheck):
    """Deterministic unless GW_FUZZ_SEED asks for another search; no example database."""
    chosen = settings(max_examples=max(1, cases), derandomize=SEED is None, database=None, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *extra_checks])

    def apply(test):
        test = chosen(test)
        return seed(int(SEED))(test) if SEED is not None else test

    return apply


# -- valid bodies ------------------------------------------------------------------------------

# No "[": the fake upstream reads [[directives]] in the last user message.
CHARS = st.characters(codec="utf-8", exclude_characters="[")
TEXT = st.text(CHARS, min_size=1, max_size=24)
NAMES = st.sampled_from(["get_time", "lookup", "f_1", "Search-2"])
TOOL = st.builds(lambda name, params: {"type": "function", "function": {"name": name, **params}}, NAMES,
                 st.sampled_from([{}, {"parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
                                  {"description": "Looks it up.", "parameters": {"type": "object"}, "strict": False}]))
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}
PART = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, TEXT),
    st.builds(lambda url: {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
              st.sampled_from(["https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo="])),
)
CONTENT = st.one_of(TEXT, st.lists(PART, min_size=1, max_size=3))
OPTIONAL = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=4)),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "max_tokens": st.integers(1, 300),
    "max_completion_tokens": st.integers(1, 300),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "user": TEXT.map(lambda text: text.replace("\x00", "")),
    "metadata": st.dictionaries(TEXT, TEXT, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "logit_bias": st.dictionaries(st.integers(0, 200_000).map(str), st.integers(-100, 100), max_size=3),
    "parallel_tool_calls": st.booleans(),
    "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
    "response_format": st.sampled_from([
        {"type": "text"}, {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": SCHEMA}},
    ]),
    "context_overflow": st.sampled_from(["error", "trim_oldest"]),
}


@st.composite
def conversations(draw) -> list[dict]:
    messages = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)})
    first = {"role": "user", "content": draw(CONTENT)}
    if draw(st.booleans()):
        first["name"] = draw(st.sampled_from(["ada", "bob_2"]))
    messages.append(first)
    turn = draw(st.sampled_from(["none", "reply", "tool"]))
    if turn == "reply":
        messages += [{"role": "assistant", "content": draw(TEXT)}, {"role": "user", "content": draw(CONTENT)}]
    elif turn == "tool":
        call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": draw(TEXT)}]
        if draw(st.booleans()):
            messages += [{"role": "assistant", "content": draw(TEXT)}, {"role": "user", "content": draw(TEXT)}]
    return messages


@st.composite
def valid_bodies(draw, models=("local", "gpt-4o-mini"), stream: bool | None = None) -> dict:
    body: dict[str, Any] = {"model": draw(st.sampled_from(models)), "messages": draw(conversations())}
    for name in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), max_size=5, unique=True)):
        body[name] = draw(OPTIONAL[name])
    if draw(st.booleans()):
        tools = draw(st.lists(TOOL, min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"]))
        names = [t["function"]["name"] for t in tools]
        body["tools"] = tools
        body["tool_choice"] = draw(st.sampled_from(["none", "auto", "required",
                                                    {"type": "function", "function": {"name": names[0]}}]))
    body["stream"] = draw(st.booleans()) if stream is None else stream
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


# -- mutations ---------------------------------------------------------------------------------

def nest(value: Any, depth: int, kind: str) -> Any:
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(CHARS, max_size=12), st.sampled_from(["", " ", "user", "function", "text", "image_url", "null", "{}"]),
)
HUGE_TEXT = st.builds(lambda piece, n: piece * n, st.sampled_from(["x", "ab ", "é", "\U0001f600", "\u200b"]),
                      st.integers(1_000, 20_000))
JUNK = st.one_of(
    SCALARS,
    HUGE_TEXT,
    st.builds(lambda n: "{" * n + "}" * n if n % 2 else '{"a":' * n + "1" + "}" * n, st.integers(10, 5_000)),
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.text(CHARS, max_size=8), SCALARS, max_size=4),
    st.builds(nest, SCALARS, st.integers(2, 400), st.sampled_from(["list", "dict"])),
)
# Field names the gateway reads, so that added fields meet its type checks.
KNOWN_KEYS = sorted({
    "role", "content", "name", "tool_calls", "function_call", "tool_call_id", "type", "text", "image_url",
    "url", "detail", "input_audio", "data", "format", "file", "file_data", "file_id", "filename", "refusal",
    "function", "arguments", "parameters", "strict", "description", "id", "schema", "json_schema",
    "include_usage", "$schema", "feature", *OPTIONAL, "model", "messages", "tools", "tool_choice", "stream",
    "stream_options",
})
OPS = ("replace", "replace", "delete", "add", "wrap", "deepen")
MAX_PATH = 10  # mutations reach this deep into the body (deeper values are junk already)


def paths(body: Any) -> list[tuple]:
    """Every path into the body down to MAX_PATH, without recursion, the root first."""
    found, stack = [], [((), body)]
    while stack:
        path, value = stack.pop()
        found.append(path)
        if len(path) < MAX_PATH:
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            stack.extend((path + (key,), child) for key, child in items)
    return sorted(found, key=lambda p: (len(p), repr(p)))


def mutate(draw, body: Any, path: tuple, op: str) -> Any:
    """The body with one mutation at `path` (in place below the root)."""
    if not path:
        return draw(JUNK) if op == "replace" else body
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    target = parent[key]
    if op == "replace":
        parent[key] = draw(JUNK)
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(target, dict):
        target[draw(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(CHARS, max_size=8)))] = draw(JUNK)
    elif op == "add" and isinstance(target, list):
        target.insert(draw(st.integers(0, len(target))), draw(JUNK))
    elif op == "wrap":
        parent[key] = draw(st.sampled_from([[target], {"value": target}]))
    elif op == "deepen":
        parent[key] = nest(target, draw(st.integers(1, 400)), draw(st.sampled_from(["list", "dict"])))
    else:
        parent[key] = draw(JUNK)
    return body


@st.composite
def mutated_bodies(draw, models=("local", "gpt-4o-mini"), stream: bool | None = None) -> Any:
    body = copy.deepcopy(draw(valid_bodies(models, stream)))  # mutated in place: not the shared constants
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(body)))
        body = mutate(draw, body, path, draw(st.sampled_from(OPS)))
    return body


def encode(body: Any, ascii_only: bool = False) -> bytes:
    """The body as JSON text (the stdlib writes the 400-level nestings orjson refuses)."""
    return json.dumps(body, ensure_ascii=ascii_only).encode()


def is_object(body: Any) -> bool:
    return isinstance(body, dict)


def assert_refusal(payload: dict, status: int, body: Any) -> None:
    """A refusal in OpenAI's error shape; a 400 names its param unless the body is no object."""
    ERRORS.validate(payload)
    assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert 400 <= status < 500, (status, payload)
    if status == 400 and is_object(body):
        assert isinstance(payload["error"]["param"], str) and payload["error"]["param"], payload


# -- layer 1: the boundary and the pre-flight, in memory ---------------------------------------

def lane(provider: str, model: str) -> LaneSpec:
    return LaneSpec(id=1, route_model="fuzz", position=0, provider=provider, upstream_model=model, base_url="",
                    api_key_env="", context_window=128_000, price_input=Decimal("1"), price_output=Decimal("2"),
                    price_cached_input=Decimal("0.5"))


LANES = {"local": lane("local", "local"), "openai": lane("openai-compatible", "gpt-4o-mini"),
         "anthropic": lane("anthropic", "claude-sonnet-4-5")}
PRINCIPAL = Principal(key_id=1, key_prefix="sk-gw-fuzz", tenant_id=1, tenant_slug="fuzz", tier="fuzz",
                      store_content=True, expires_at=None, allowed_models=(), requests_per_minute=None,
                      requests_per_hour=None, tokens_per_minute=None, max_concurrent=None, daily_budget_usd=None,
                      monthly_budget_usd=None, max_tokens_cap=None)


def through_the_boundary(raw: bytes, feature: str | None = None, overflow: str | None = None):
    """What a request meets before any network call, in order: the validated request."""
    data = parse_json(raw)
    req = validate_chat(data, feature, overflow)
    fingerprint(data)
    # The pre-flight: every lane here counts with o200k, so one lane covers them all.
    call = ChatCall(PRINCIPAL, req, Route("fuzz", (LANES["openai"],), "fuzz", 0), CallContext("req_fuzz"))
    call.preflight()
    return req


def to_each_provider(req) -> None:
    """Each provider adapter's request built from it (the Anthropic one may refuse with a 400)."""
    LocalProvider("", None)._plan(req)
    orjson.dumps(build_body(LANES["openai"], req, stream=req.stream))
    to_anthropic(LANES["anthropic"], req)


HEADER_VALUES = st.one_of(st.none(), st.sampled_from(["checkout", "a/b:c.d", "trim_oldest", "error"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=70))


@fuzz_settings(CASES)
@given(body=mutated_bodies(), feature=HEADER_VALUES, overflow=HEADER_VALUES, ascii_only=st.booleans())
def test_no_mutated_body_raises_anything_but_a_400_before_the_provider_call(body, feature, overflow, ascii_only):
    try:
        to_each_provider(through_the_boundary(encode(body, ascii_only), feature, overflow))
    except GatewayError as exc:
        assert_refusal(exc.to_dict(), exc.status, body)
        assert exc.status == 400, exc.to_dict()


@fuzz_settings(max(100, CASES // 10))
@given(body=valid_bodies())
def test_every_valid_body_the_fuzzer_starts_from_passes_the_boundary(body):
    """The mutations start from bodies the gateway accepts, or they would test little."""
    req = through_the_boundary(encode(body))
    LocalProvider("", None)._plan(req)
    orjson.dumps(build_body(LANES["openai"], req, stream=req.stream))


# -- layer 2: the running server, over HTTP ----------------------------------------------------

BIG = {"requests_per_minute": 1_000_000, "requests_per_hour": None, "tokens_per_minute": None, "max_concurrent": 1000,
       "daily_budget_usd": None, "monthly_budget_usd": None}
SHARED_KEYS = ("fuzz-shared-1", "fuzz-shared-2")  # reused across cases: replays and 422s too


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One keep-alive connection to the server (reopened after the server closes one)."""

    def __init__(self, server, secret: str) -> None:
        self.host, self.port = "127.0.0.1", server.port
        self.secret = secret
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def post(self, raw: bytes, headers: dict[str, str], path: str = "/v1/chat/completions") -> Answer:
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json", **headers}
        for attempt in (1, 2):
            try:
                self.conn.request("POST", path, body=raw, headers=headers)
                response = self.conn.getresponse()
                answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
                if response.will_close:
                    self.conn.close()
                return answer
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def structured(body: Any) -> bool:
    """The one honest 5xx: a strict schema the model's prose answer does not match (502)."""
    fmt = body.get("response_format") if is_object(body) else None
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def check_answer(answer: Answer, body: Any) -> None:
    if answer.status == 200:
        if answer.headers.get("content-type", "").startswith("text/event-stream"):
            text = answer.body.decode()
            if not text.rstrip().endswith("data: [DONE]"):
                last = orjson.loads(text.rstrip().rsplit("data: ", 1)[1])
                assert last["error"]["code"] == "structured_output_invalid" and structured(body), text[-500:]
        else:
            assert "choices" in orjson.loads(answer.body)
        return
    payload = orjson.loads(answer.body)
    assert answer.headers["content-type"].startswith("application/json") and answer.headers.get("x-request-id")
    if answer.status == 502 and payload["error"]["code"] == "structured_output_invalid" and structured(body):
        return
    assert answer.status < 500, (answer.status, payload, encode(body)[:2000])
    assert_refusal(payload, answer.status, body)


@pytest.fixture()
def fuzz_client(server, tenants, fakes_reset):
    _, _, secret = tenants.make(tier=BIG)
    client = Client(server, secret)
    yield client
    client.conn.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotency-key"])
def test_no_mutated_body_gets_a_5xx_from_the_server(fuzz_client, stream, idempotent):
    @fuzz_settings(HTTP_CASES // 4, HealthCheck.function_scoped_fixture)
    @given(body=st.one_of(mutated_bodies(stream=stream), valid_bodies(stream=stream)), data=st.data())
    def run(body, data):
        headers = {}
        if idempotent:
            kind = data.draw(st.sampled_from(["unique", "unique", "shared", "odd"]), label="key")
            if kind == "unique":  # not drawn: Hypothesis replays a case with the same draws
                headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4().hex}"
            elif kind == "shared":
                headers["Idempotency-Key"] = data.draw(st.sampled_from(SHARED_KEYS))
            elif (odd := data.draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300))).strip():
                headers["Idempotency-Key"] = odd
        answer = fuzz_client.post(encode(body, data.draw(st.booleans())), headers)
        statuses[answer.status] += 1
        check_answer(answer, body)

    statuses: Counter[int] = Counter()
    run()
    # Both ends were reached: calls that went through to the provider, and refusals.
    assert statuses[200] and statuses[400], statuses

