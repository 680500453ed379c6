"""Keep the shared key cache honest: any change to a key, tenant or tier drops its entries."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from llm_platform.redis import get_redis

from .auth import redis_key
from .models import ApiKey, Tenant, Tier

log = logging.getLogger(__name__)


def _drop(hashes: list[str]) -> None:
    if not hashes:
        return

    def run() -> None:
        try:
            get_redis().delete(*(redis_key(h) for h in hashes))
        except Exception:  # Redis down: entries expire by TTL; say so loudly
            log.exception("could not invalidate %d cached key(s)", len(hashes))

    transaction.on_commit(run)


@receiver([post_save, post_delete], sender=ApiKey)
def key_changed(sender, instance: ApiKey, **kwargs) -> None:
    _drop([instance.hashed_key])


@receiver([post_save, post_delete], sender=Tenant)
def tenant_changed(sender, instance: Tenant, **kwargs) -> None:
    _drop(list(ApiKey.objects.filter(tenant_id=instance.pk).values_list("hashed_key", flat=True)))


@receiver([post_save, post_delete], sender=Tier)
def tier_changed(sender, instance: Tier, **kwargs) -> None:
    _drop(
        list(
            ApiKey.objects.filter(tenant__tier_id=instance.pk).values_list("hashed_key", flat=True)
        )
    )
