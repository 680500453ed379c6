"""A fake Anthropic upstream: ``POST /v1/messages`` (JSON and SSE), token counting and models.

What it answers is described in ``anthropic_wire``; how to steer it (directives, the
``X-Fake-Fault`` header, settings) in ``harness`` and ``directives``.
``python -m tests.support.fake_anthropic --port 8002 --chunks 20`` serves it standalone.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from aiohttp import web

from tests.support import anthropic_wire as wire
from tests.support.anthropic_wire import count_input_tokens
from tests.support.directives import NO_FAULTS, DirectiveError, Faults
from tests.support.harness import RECORD, FakeServer, json_response, loads, new_id

__all__ = ["FakeAnthropic", "count_input_tokens"]


class FakeAnthropic(FakeServer):
    """Fake Anthropic Messages; ``sdk_base_url`` (no ``/v1``) is what ``anthropic.Anthropic`` takes."""

    vendor = "anthropic"
    sdk_suffix = ""
    default_port = 8002
    models: tuple[tuple[str, str, str], ...] = (
        ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
        ("claude-opus-4-6", "Claude Opus 4.6", "2026-02-04T00:00:00Z"),
        ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    )

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            web.post("/v1/messages", self.messages),
            web.post("/v1/messages/count_tokens", self.count_tokens),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
        ]

    @staticmethod
    def error(status: int, type_: str, message: str, headers: dict[str, str]) -> web.Response:
        body = wire.error_body(type_, message, headers["request-id"])
        return json_response(body, status=status, headers=headers)

    def header_error(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """Anthropic checks the key, then ``anthropic-version``, before the body."""
        key = request.headers.get("x-api-key")
        auth = request.headers.get("Authorization", "")
        if key is None and auth.startswith("Bearer "):
            key = auth[7:]
        if not key:
            return self.error(401, "authentication_error", "x-api-key header is required", headers)
        if self.api_key is not None and key != self.api_key:
            return self.error(401, "authentication_error", "invalid x-api-key", headers)
        if not request.headers.get("anthropic-version"):
            message = "anthropic-version: header is required"
            return self.error(400, "invalid_request_error", message, headers)
        return None

    def status_fault(self, faults: Faults, headers: dict[str, str]) -> web.Response:
        status = faults.status or 500
        type_, message = wire.STATUS_ERRORS[status]
        if status == 429:
            headers["retry-after"] = str(max(1, -(-faults.retry_after_ms // 1000)))
            headers["retry-after-ms"] = str(faults.retry_after_ms)
            headers["anthropic-ratelimit-requests-remaining"] = "0"
        return self.error(status, type_, message, headers)

    async def list_models(self, request: web.Request) -> web.Response:
        self._record(request, None, b"")
        await self.wait_before_answer(NO_FAULTS)
        headers = {"request-id": new_id("req_", 16)}
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        data = [wire.model_info(*m) for m in self.models]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        page = {"data": data, "first_id": first, "last_id": last, "has_more": False}
        return json_response(page, headers=headers)

    async def get_model(self, request: web.Request) -> web.Response:
        self._record(request, None, b"")
        await self.wait_before_answer(NO_FAULTS)
        headers = {"request-id": new_id("req_", 16)}
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        wanted = request.match_info["model"]
        for model in self.models:
            if model[0] == wanted:
                return json_response(wire.model_info(*model), headers=headers)
        return self.error(404, "not_found_error", f"model: {wanted}", headers)

    async def count_tokens(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = loads(raw)
        self._record(request, body, raw)
        await self.wait_before_answer(NO_FAULTS)
        headers = {"request-id": new_id("req_", 16)}
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        if (problem := wire.validate(body, need_max_tokens=False)) is not None:
            return self.error(400, "invalid_request_error", problem, headers)
        return json_response({"input_tokens": count_input_tokens(body)}, headers=headers)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = loads(raw)
        self._record(request, body, raw)
        rid = new_id("req_", 16)
        headers = {"request-id": rid}
        messages = body.get("messages") if isinstance(body, dict) else None
        text, from_tool = wire.source_text(messages)
        try:
            directives = self.directives_in(text)
            faults = self.faults_for(request, directives)
        except DirectiveError as exc:
            return self.error(400, "invalid_request_error", f"fake: {exc}", headers)
        await self.wait_before_answer(faults)
        if (denied := self.header_error(request, headers)) is not None:
            return denied
        if faults.status:
            return self.status_fault(faults, headers)
        if (problem := wire.validate(body)) is not None:
            return self.error(400, "invalid_request_error", problem, headers)

        plan = wire.plan_message(body, text, from_tool, directives, faults, self.chunks)
        usage = wire.usage(body, directives, plan.tokens)
        mid, model = new_id("msg_"), body["model"]
        if body.get("stream"):
            events = wire.stream_events(mid, model, plan, usage, faults, rid)
            return await self.send_stream(request, events, faults, headers)
        payload = orjson.dumps(wire.message(mid, model, plan, usage))
        if faults.cut_after is not None:
            return await self.send_cut_body(request, payload, headers)
        if faults.malformed:
            request[RECORD].outcome = "malformed"
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, headers=headers, content_type="application/json")


if __name__ == "__main__":
    FakeAnthropic.main()
