"""ASGI entry point: HTTP (gateway hot paths + Django) and WebSocket (Channels).

Serve with any ASGI server: `uvicorn llm_platform.asgi:application` (what the run command
uses), daphne or granian.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from gateway.api.asgi import GatewayHTTP  # noqa: E402
from gateway.api.lifespan import lifespan  # noqa: E402
from gateway.ws_routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": GatewayHTTP(django_app),
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        "lifespan": lifespan,
    }
)
