"""Admin edits to routes reach this process at once and every other within seconds."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import Lane, ModelRoute
from .routing import routes


@receiver([post_save, post_delete], sender=ModelRoute)
@receiver([post_save, post_delete], sender=Lane)
def route_changed(sender, **kwargs) -> None:
    routes.invalidate()
