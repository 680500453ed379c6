"""The few HTTP primitives the ASGI hot path needs: a parsed request and response senders."""

from __future__ import annotations

import re
import uuid

import orjson

from ..errors import GatewayError

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
JSON = b"application/json"
DRAIN_LIMIT_FACTOR = 16


def request_id_from(value: str | None) -> str:
    """A client's X-Request-ID is echoed if it is sane; otherwise a fresh one."""
    if value and _SANE_ID.match(value):
        return value
    return f"req_{uuid.uuid4().hex}"


class Request:
    __slots__ = ("scope", "method", "path", "headers", "body", "request_id", "call_id")

    def __init__(self, scope: dict) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        self.body = b""
        client_id = self.headers.get("x-request-id")
        self.request_id = request_id_from(client_id)
        # Our own id for this call (usage row, stream, idempotency): unique even when a client
        # reuses its X-Request-ID, which is echoed but never trusted to be unique.
        self.call_id = self.request_id if self.request_id != client_id else f"req_{uuid.uuid4().hex}"

    @property
    def client_ip(self) -> str:
        client = self.scope.get("client")
        return client[0] if client else ""

    async def read_body(self, receive, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        declared = self.headers.get("content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > limit
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                too_large = True
            if not too_large:
                parts.append(chunk)
            # An oversized body is read and dropped (up to a bound) so the client, still
            # sending, gets to read our 413 instead of a connection reset.
            if not message.get("more_body") or size > DRAIN_LIMIT_FACTOR * limit:
                break
        if too_large:
            raise GatewayError(413, f"The request body is too large: at most {limit} bytes.", code="request_too_large")
        self.body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self.body


def header_list(request_id: str, content_type: bytes, extra: dict[str, str] | None = None,
                pairs: list[tuple[bytes, bytes]] = ()) -> list:
    """A response's ASGI headers: `extra` by name, `pairs` already encoded (lower-case names)."""
    headers = [(b"content-type", content_type), (b"x-request-id", request_id.encode()), *pairs]
    if extra:
        headers.extend((k.lower().encode(), str(v).encode()) for k, v in extra.items())
    return headers


async def send_json(send, status: int, body: bytes, request_id: str, extra: dict | None = None,
                    pairs: list[tuple[bytes, bytes]] = ()) -> None:
    headers = header_list(request_id, JSON, extra, pairs)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send, exc: GatewayError, request_id: str) -> None:
    await send_json(send, exc.status, exc.body(), request_id, exc.headers)


def dumps(obj) -> bytes:
    return orjson.dumps(obj)
