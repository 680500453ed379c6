"""OpenAI and any OpenAI-compatible server, spoken over the wire with one aiohttp session.

The official SDK costs 2-10 ms of CPU per call (../shared/DEPENDENCIES.md); this adapter builds
the body with orjson, forwards the provider's bytes untouched and parses only what the platform
needs (usage, finish reason, ids).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import orjson

from ..lane_policy import policy_for
from ..routing import LaneSpec
from ..types import ChatRequest, Chunk, Completion, Outcome, Usage
from .base import Provider, UpstreamError, map_upstream_status, parse_retry_after, scrub, timeouts


def build_body(lane: LaneSpec, req: ChatRequest, stream: bool) -> dict:
    body = {"model": lane.upstream_model, "messages": req.messages, **req.params}
    if req.max_tokens is not None:
        # OpenAI's own API wants the newer name; compatible servers (vLLM, Ollama) the older one.
        body["max_completion_tokens" if lane.provider == "openai" else "max_tokens"] = req.max_tokens
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the platform always needs usage
    return body


def request_timeout(lane: LaneSpec) -> aiohttp.ClientTimeout:
    """Per-lane: connect, idle between reads (also before the first byte) and the whole call."""
    policy = policy_for(lane)
    connect, total = timeouts()
    return aiohttp.ClientTimeout(total=policy.timeouts.total_s or total,
                                 sock_connect=policy.timeouts.connect_s or connect,
                                 sock_read=policy.timeouts.idle_s or None)


class OpenAIProvider(Provider):
    def __init__(self, base_url: str, api_key: str | None) -> None:
        super().__init__(base_url, api_key)
        self.url = f"{base_url}/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connect, total = timeouts()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=total, sock_connect=connect),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                auto_decompress=True,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, body: dict, lane: LaneSpec) -> aiohttp.ClientResponse:
        try:
            response = await self.session.post(self.url, data=orjson.dumps(body), headers=self.headers,
                                               timeout=request_timeout(lane))
        except TimeoutError:
            raise UpstreamError(504, f"The provider '{self.kind}' did not answer in time.", code="upstream_timeout", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, f"Could not reach the provider '{self.kind}': {type(exc).__name__}.", code="upstream_unreachable", retryable=True) from None
        if response.status != 200:
            try:
                payload = await response.read()
                error = orjson.loads(payload).get("error") or {}
                message = error.get("message") if isinstance(error, dict) else str(error)
                code = error.get("code") if isinstance(error, dict) else None
            except Exception:  # not JSON: say nothing of its body
                message, code = "", None
            finally:
                response.release()
            raise map_upstream_status(response.status, message or "", code, parse_retry_after(response.headers), self.kind)
        return response

    async def complete(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> Completion:
        response = await self._post(build_body(lane, req, stream=False), lane)
        outcome.provider_request_id = response.headers.get("x-request-id")
        try:
            raw = await response.read()
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamError(502, f"The provider '{self.kind}' dropped the answer.", code="upstream_disconnected", retryable=True) from None
        outcome.first_token_at = time.perf_counter()
        try:
            obj = orjson.loads(raw)
            choices = obj["choices"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UpstreamError(502, f"The provider '{self.kind}' sent a malformed answer.", code="upstream_malformed", retryable=True) from None
        outcome.upstream_model = obj.get("model") or lane.upstream_model
        outcome.usage = Usage.from_openai(obj.get("usage"))
        if choices:
            outcome.finish_reason = choices[0].get("finish_reason")
            if outcome.completion_text_parts is not None:
                outcome.completion_text_parts.append(str((choices[0].get("message") or {}).get("content") or ""))
        return Completion(raw=raw, obj=obj)

    def _chunk(self, data: bytes, outcome: Outcome) -> Chunk:
        """One `data:` payload: parsed only for what the platform needs, forwarded as bytes."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(502, f"The provider '{self.kind}' sent a malformed stream event.", code="upstream_malformed") from None
        if "error" in obj and "choices" not in obj:
            error = obj["error"] if isinstance(obj["error"], dict) else {}
            raise UpstreamError(502, scrub(str(error.get("message") or "The provider reported an error mid-stream.")), code="upstream_stream_error")
        choices = obj.get("choices")
        usage = obj.get("usage")
        if usage:
            outcome.usage = Usage.from_openai(usage)
        if outcome.upstream_model is None:
            outcome.upstream_model = obj.get("model")
        if choices:
            choice = choices[0]
            if outcome.first_token_at is None:
                outcome.first_token_at = time.perf_counter()
            if choice.get("finish_reason"):
                outcome.finish_reason = choice["finish_reason"]
            if outcome.completion_text_parts is not None:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    outcome.completion_text_parts.append(content)
        return Chunk(raw=data, obj=obj, usage_only=not choices and bool(usage))

    async def stream(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> AsyncIterator[Chunk]:
        response = await self._post(build_body(lane, req, stream=True), lane)
        outcome.provider_request_id = response.headers.get("x-request-id")
        done = False
        partial = b""
        try:
            # One network read may carry many events: they go out together (`batched`), so the
            # client gets one write per read instead of one per event.
            async for block in response.content.iter_any():
                lines = (partial + block).split(b"\n")
                partial = lines.pop()
                ready = []
                failed: UpstreamError | None = None
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        ready.append(self._chunk(data, outcome))
                    except UpstreamError as exc:
                        failed = exc  # after the events before it: where reads split must not matter
                        break
                for i, chunk in enumerate(ready):
                    chunk.batched = i + 1 < len(ready)
                    yield chunk
                if failed is not None:
                    raise failed
                if done:
                    break
            if done:
                # Read the body's last bytes (the chunked terminator) so the connection goes
                # back to the pool instead of being closed: a new TCP handshake per stream costs.
                while await response.content.readany():
                    pass
        except TimeoutError:  # aiohttp's sock_read: silence longer than the idle timeout
            raise UpstreamError(504, f"The provider '{self.kind}' went silent mid-stream.", code="upstream_idle_timeout") from None
        except aiohttp.ClientError:
            raise UpstreamError(502, f"The provider '{self.kind}' stream broke off.", code="upstream_stream_cut") from None
        finally:
            # Closing an unfinished response drops the connection, so the provider stops generating.
            response.release() if done else response.close()
        if not done:
            raise UpstreamError(502, f"The provider '{self.kind}' stream ended before it was complete.", code="upstream_stream_cut")
