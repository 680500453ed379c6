"""A URLconf for tests: the project's URLs plus Django views under /v1/ that fail in each of the
ways Django answers by itself (405, CSRF 403, an unhandled exception)."""

from django.http import HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from llm_platform.urls import handler404, handler500  # noqa: F401
from llm_platform.urls import urlpatterns as project_urls


@csrf_exempt
@require_GET
def get_only(request):
    return HttpResponse("ok")


def form(request):  # CSRF-protected by the middleware, as a session-authenticated API view is
    return HttpResponse("ok")


def boom(request):
    raise RuntimeError("a bug in a Django view")


urlpatterns = [
    path("v1/probe/get-only", get_only),
    path("v1/probe/form", form),
    path("v1/probe/boom", boom),
    *project_urls,
]
