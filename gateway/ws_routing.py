"""WebSocket routes (the browser chat consumer arrives with its issue)."""

websocket_urlpatterns: list = []
