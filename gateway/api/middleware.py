"""Django-side counterpart of the hot path's request ids: every response carries one."""

from .http import request_id_from


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = request_id_from(request.headers.get("x-request-id"))
        response = self.get_response(request)
        response["x-request-id"] = request.request_id
        return response
