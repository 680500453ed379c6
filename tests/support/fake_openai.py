"""A fake OpenAI upstream: ``POST /v1/chat/completions`` (JSON and SSE) and ``GET /v1/models``.

What it answers is described in ``openai_wire``; how to steer it (directives, the
``X-Fake-Fault`` header, settings) in ``harness`` and ``directives``.
``python -m tests.support.fake_openai --port 8001 --chunks 20`` serves it standalone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import orjson
from aiohttp import web

from tests.support import openai_wire as wire
from tests.support.directives import NO_FAULTS, DirectiveError, Faults
from tests.support.harness import RECORD, FakeServer, json_response, loads, new_id
from tests.support.openai_wire import count_prompt_tokens

__all__ = ["FakeOpenAI", "count_prompt_tokens"]

MODEL_CREATED = 1715367049


class FakeOpenAI(FakeServer):
    """Fake OpenAI Chat Completions; ``sdk_base_url`` is what ``openai.OpenAI`` takes."""

    vendor = "openai"
    sdk_suffix = "/v1"
    default_port = 8001
    models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
        ]

    @staticmethod
    def error(
        status: int,
        message: str,
        headers: dict[str, str],
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> web.Response:
        body = wire.error_body(message, type_, param, code)
        return json_response(body, status=status, headers=headers)

    # A provider that echoes the credential it was sent in its errors (message and code, JSON
    # and mid-stream), as some do in an "incorrect API key" message. Reset by ``reset()``.
    echo_key = False

    def reset(self) -> None:
        super().reset()
        self.echo_key = False

    @staticmethod
    def sent_key(request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        return auth[7:].strip() if auth.startswith("Bearer ") else ""

    def echoed(self, request: web.Request, message: str) -> str:
        return f"{message} Key used: {self.sent_key(request)}" if self.echo_key else message

    def auth_error(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if not key:
            return self.error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                headers,
            )
        if self.api_key is not None and key != self.api_key:
            return self.error(401, "Incorrect API key provided.", headers, code="invalid_api_key")
        return None

    def status_fault(self, faults: Faults, headers: dict[str, str], request: web.Request | None = None) -> web.Response:
        status = faults.status or 500
        message, type_, code = wire.STATUS_ERRORS[status]
        if self.echo_key and request is not None:
            message, code = self.echoed(request, message), f"key_{self.sent_key(request)}"
        if status == 429:
            headers["retry-after"] = str(max(1, -(-faults.retry_after_ms // 1000)))
            headers["retry-after-ms"] = str(faults.retry_after_ms)
            headers["x-ratelimit-remaining-requests"] = "0"
        return self.error(status, message, headers, type_=type_, code=code)

    async def list_models(self, request: web.Request) -> web.Response:
        self._record(request, None, b"")
        await self.wait_before_answer(NO_FAULTS)
        headers = {"x-request-id": new_id("req_", 16)}
        if (denied := self.auth_error(request, headers)) is not None:
            return denied
        data = [self.model_object(m) for m in self.models]
        return json_response({"object": "list", "data": data}, headers=headers)

    async def get_model(self, request: web.Request) -> web.Response:
        self._record(request, None, b"")
        await self.wait_before_answer(NO_FAULTS)
        headers = {"x-request-id": new_id("req_", 16)}
        if (denied := self.auth_error(request, headers)) is not None:
            return denied
        model = request.match_info["model"]
        if model not in self.models:
            message = f"The model '{model}' does not exist"
            return self.error(404, message, headers, param="model", code="model_not_found")
        return json_response(self.model_object(model), headers=headers)

    @staticmethod
    def model_object(model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "system"}

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = loads(raw)
        self._record(request, body, raw)
        headers = {"x-request-id": new_id("req_", 16), "openai-processing-ms": "1"}
        messages = body.get("messages") if isinstance(body, dict) else None
        text, from_tool = wire.source_message(messages)
        try:
            directives = self.directives_in(text)
            faults = self.faults_for(request, directives)
        except DirectiveError as exc:
            return self.error(400, f"fake: {exc}", headers)
        await self.wait_before_answer(faults)
        if (denied := self.auth_error(request, headers)) is not None:
            return denied
        if faults.status:
            return self.status_fault(faults, headers, request)
        if (problem := wire.validate(body)) is not None:
            message, param, code = problem
            return self.error(400, message, headers, param=param, code=code)

        plans = [
            wire.plan_choice(body, text, from_tool, directives, faults, self.chunks)
            for _ in range(body.get("n") or 1)
        ]
        usage = wire.usage(body["messages"], directives, sum(p.tokens for p in plans))
        cid, created, model = new_id("chatcmpl-"), int(time.time()), body["model"]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = wire.stream_events(
                cid, created, model, plans, usage if include_usage else None, faults
            )
            if self.echo_key and faults.stream_error_after is not None:
                key = self.sent_key(request).encode()
                events[-1] = events[-1].replace(b'request."', b'request. Key used: ' + key + b'"')
            return await self.send_stream(request, events, faults, headers)
        payload = orjson.dumps(wire.completion(cid, created, model, plans, usage))
        if faults.cut_after is not None:
            return await self.send_cut_body(request, payload, headers)
        if faults.malformed:
            request[RECORD].outcome = "malformed"
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, headers=headers, content_type="application/json")


if __name__ == "__main__":
    FakeOpenAI.main()
