"""The provider interface and the registry of long-lived clients (one per credential)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from django.conf import settings

from llm_platform.runtime import Runtime

from ..errors import GatewayError
from ..routing import LaneSpec
from ..types import ChatRequest, Chunk, Completion, Outcome
from .credentials import redact, remember_name, remember_value


def scrub(text: str, limit: int = 300) -> str:
    """Provider text may echo the credential it was sent: every configured one is removed (then
    the text is cut, so that no cut can leave half a key to escape the match)."""
    return redact(text)[:limit]


class UpstreamError(GatewayError):
    """A provider failed. `retryable` says whether another attempt (or lane) could succeed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "upstream_error",
        retryable: bool = False,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        super().__init__(status, message, type=type, code=code, param=param, headers=headers)
        self.retryable = retryable
        self.upstream_status = upstream_status
        self.retry_after = retry_after


def map_upstream_status(
    status: int, message: str, code: str | None, retry_after: float | None, provider: str
) -> UpstreamError:
    """A provider's HTTP error as what our client should see (never the provider's raw body)."""
    message = scrub(message or "")
    # The provider's error code reaches the tenant and the usage row: no credential in it either.
    code = scrub(str(code), 64) if code else None
    if status in (400, 404, 422) and code in ("context_length_exceeded", "string_above_max_length"):
        return UpstreamError(400, message, code="context_length_exceeded", upstream_status=status, type="invalid_request_error")
    if status in (400, 413, 422):
        return UpstreamError(400, f"The provider rejected the request: {message}", code=code or "invalid_request_error", upstream_status=status, type="invalid_request_error")
    if status in (401, 403):
        return UpstreamError(502, f"The platform's credentials for provider '{provider}' were refused; an operator has to fix them.", code="upstream_auth_failed", upstream_status=status)
    if status == 404:
        return UpstreamError(502, f"The provider '{provider}' does not know the configured upstream model.", code="upstream_model_not_found", upstream_status=status)
    if status == 429:
        return UpstreamError(429, f"The provider '{provider}' is rate limiting the platform; retry shortly.", code="upstream_rate_limited", retryable=True, upstream_status=status, retry_after=retry_after or 1, type="rate_limit_error")
    if status in (408, 409):
        return UpstreamError(502, f"The provider '{provider}' asked to retry ({status}).", retryable=True, upstream_status=status, retry_after=retry_after or 1)
    if status == 529 or status >= 500:
        return UpstreamError(502, f"The provider '{provider}' failed ({status}); retry shortly.", code="upstream_unavailable", retryable=True, upstream_status=status, retry_after=retry_after or 1)
    return UpstreamError(502, f"The provider '{provider}' answered {status} unexpectedly.", upstream_status=status)


def parse_retry_after(headers) -> float | None:
    """Honour `retry-after-ms` (OpenAI/Anthropic) before `Retry-After` (seconds)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None
    return None


class Provider(ABC):
    """Turns a normalized request into one vendor's call; knows nothing of tenants."""

    kind: str = ""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url
        self.api_key = api_key
        remember_value(api_key)  # what its Authorization / x-api-key header carries upstream

    @abstractmethod
    async def complete(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> Completion:
        """The whole answer as an OpenAI `chat.completion`."""

    @abstractmethod
    def stream(self, lane: LaneSpec, req: ChatRequest, outcome: Outcome) -> AsyncIterator[Chunk]:
        """OpenAI `chat.completion.chunk`s as they arrive, ending with a usage-only chunk."""

    async def aclose(self) -> None:  # pragma: no cover - default: nothing held
        return None


def lane_credentials(lane: LaneSpec) -> str | None:
    if not lane.api_key_env:
        return None
    remember_name(lane.api_key_env)
    value = os.environ.get(lane.api_key_env)
    if not value:
        raise UpstreamError(
            503,
            f"Model '{lane.route_model}' is not configured on this platform: its credential "
            f"variable {lane.api_key_env} is not set.",
            code="provider_not_configured",
        )
    return value


_registered: dict[str, type[Provider]] = {}


def register_provider(kind: str, factory: type[Provider]) -> None:
    """Serve lanes of `kind` with `factory(base_url, api_key)`: how a test or a plug-in adds a
    provider the route table can name."""
    _registered[kind] = factory


def _factory(kind: str):
    if kind in _registered:
        return _registered[kind]
    if kind in ("openai", "openai-compatible"):
        from .openai import OpenAIProvider

        return OpenAIProvider
    if kind == "anthropic":
        from .anthropic import AnthropicProvider

        return AnthropicProvider
    if kind == "local":
        from .local import LocalProvider

        return LocalProvider
    raise GatewayError(500, f"Unknown provider kind {kind!r} in the route table.", code="bad_route")


def default_base_url(kind: str) -> str:
    if kind == "openai":
        return os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if kind == "anthropic":
        return os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
    return ""


def get_provider(lane: LaneSpec, runtime: Runtime | None = None) -> Provider:
    """The long-lived adapter for this lane's provider, base URL and credential, held by the
    running loop's runtime (its connections cannot cross loops)."""
    api_key = lane_credentials(lane)
    base_url = (lane.base_url or default_base_url(lane.provider)).rstrip("/")
    held = (runtime or Runtime.current()).providers
    key = (lane.provider, base_url, api_key)
    provider = held.get(key)
    if provider is None:
        provider = _factory(lane.provider)(base_url, api_key)
        provider.kind = lane.provider
        held[key] = provider
    return provider


async def close_all() -> None:
    """Close the running loop's adapters (their connection pools)."""
    held = Runtime.current().providers
    for provider in list(held.values()):
        await provider.aclose()
    held.clear()


def timeouts() -> tuple[float, float]:
    return settings.GATEWAY["UPSTREAM_CONNECT_TIMEOUT"], settings.GATEWAY["UPSTREAM_TIMEOUT"]
