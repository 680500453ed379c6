"""One error type for every client-visible failure, raised anywhere in the gateway.

Each front door renders it in its own protocol's shape (`to_dict` is OpenAI's, the platform's
default); `fields()` and `from_fields()` carry it through the resumable event store, so a
replayed stream ends with the same error in whichever shape its front door speaks."""

from __future__ import annotations

import orjson

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """A failure the client sees: HTTP status, OpenAI error type/code/param, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.code = code
        self.param = param
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def fields(self) -> dict:
        """Protocol-neutral: what `from_fields` needs to raise it again (stored with a stream)."""
        return {"status": self.status, "message": self.message, "type": self.type, "code": self.code,
                "param": self.param, "headers": self.headers}

    @classmethod
    def from_fields(cls, data: dict) -> GatewayError:
        return cls(int(data["status"]), str(data["message"]), type=data.get("type"), code=data.get("code"),
                   param=data.get("param"), headers=data.get("headers") or None)


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def not_found_error(path: str) -> GatewayError:
    return GatewayError(404, f"Unknown request URL: {path}. Please check the URL.", code="unknown_url")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {method} is not allowed for {path}.", code="method_not_allowed")
