"""Django-side counterpart of the hot path: every response carries a request id, and every error
under `/v1/` is in the front door's `{"error": {...}}` shape, whatever Django would have said."""

from django.http import JsonResponse

from ..errors import GatewayError, method_not_allowed, not_found_error
from .http import request_id_from


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = request_id_from(request.headers.get("x-request-id"))
        response = self.get_response(request)
        response["x-request-id"] = request.request_id
        return response


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def api_error_for(request, status: int) -> GatewayError:
    """What an OpenAI client should read for an error page Django made on its own."""
    if status == 404:
        return not_found_error(request.path)
    if status == 405:
        return method_not_allowed(request.method, request.path)
    if status == 400:
        return GatewayError(400, "Bad request: the platform could not accept it (for example, its Host header names a host this platform does not serve).", code="bad_request")
    if status == 403:
        return GatewayError(403, "Forbidden: the request was refused (for example, a missing or wrong CSRF token on a session-authenticated call).", code="forbidden")
    if status == 413:
        return GatewayError(413, "The request is too large.", code="request_too_large")
    if status >= 500:
        return GatewayError(status, "The platform hit an internal error; it has been logged.", code="internal_error")
    return GatewayError(status, f"The request failed ({status}).", code="request_failed")


class ApiErrorShapeMiddleware:
    """Outermost but one, so it also sees what Django turned an exception into below it (a bad
    Host header's 400, a CSRF failure's 403, a 405, DEBUG's HTML pages): under `/v1/` an error
    that is not already JSON is replaced by the same status in OpenAI's error shape."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (response.status_code < 400 or not _is_api(request.path)
                or response.get("Content-Type", "").startswith("application/json")):
            return response
        exc = api_error_for(request, response.status_code)
        shaped = JsonResponse(exc.to_dict(), status=response.status_code)
        for header in ("Allow", "Retry-After"):
            if header in response:
                shaped[header] = response[header]
        return shaped
