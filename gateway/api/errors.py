"""DRF's errors in the gateway's error shape. `GatewayError` itself lives in gateway/errors.py."""

from __future__ import annotations

from ..errors import GatewayError


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
