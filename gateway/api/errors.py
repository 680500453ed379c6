"""One error type for every client-visible failure, rendered in one place in OpenAI's shape."""

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


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def not_found_error(path: str) -> GatewayError:
    return GatewayError(404, f"Unknown request URL: {path}. Please check the URL.", code="unknown_url")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {method} is not allowed for {path}.", code="method_not_allowed")


def drf_exception_handler(exc, context):
    """DRF's errors in the same `{"error": {...}}` shape as the hot path's."""
    from rest_framework.response import Response
    from rest_framework.views import exception_handler

    if isinstance(exc, GatewayError):
        return Response(exc.to_dict(), status=exc.status, headers=exc.headers)
    response = exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data
    if isinstance(detail, dict) and "detail" in detail:
        message, param = str(detail["detail"]), None
    elif isinstance(detail, dict) and detail:
        param, errors = next(iter(detail.items()))
        message = f"{param}: {' '.join(map(str, errors)) if isinstance(errors, list) else errors}"
    else:
        message, param = str(detail), None
    code = getattr(getattr(exc, "default_code", None), "__str__", lambda: None)()
    response.data = GatewayError(response.status_code, message, code=code, param=param).to_dict()
    return response
