from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from billing.writer import register_drain

        from . import signals  # noqa: F401 - route table invalidation
        from .events import drain_breaker_events

        register_drain(drain_breaker_events)  # the usage writer moves breaker transitions too
