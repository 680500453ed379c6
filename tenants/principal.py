"""What the gateway needs to know about a caller, resolved from a key, cheap to cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal

from .models import ApiKey, LimitFields


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: int
    key_prefix: str
    tenant_id: int
    tenant_slug: str
    tier: str
    store_content: bool
    expires_at: float | None  # epoch seconds
    allowed_models: tuple[str, ...]  # empty = every model
    requests_per_minute: int | None
    requests_per_hour: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    daily_budget_usd: str | None  # Decimal as text, to survive JSON
    monthly_budget_usd: str | None
    max_tokens_cap: int | None  # effective: the key's override, else the tier's
    key_limits: dict = field(default_factory=dict)  # the key's own overrides (non-null only)

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def budget(self, name: str) -> Decimal | None:
        value = getattr(self, name)
        return None if value is None else Decimal(value)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Principal:
        data = dict(data)
        data["allowed_models"] = tuple(data.get("allowed_models") or ())
        return cls(**data)

    @classmethod
    def from_key(cls, key: ApiKey) -> Principal:
        """Tier limits apply to the tenant as a whole; a key's overrides add limits of its own."""
        tier = key.tenant.tier
        limits, key_limits = {}, {}
        for name in LimitFields.LIMIT_NAMES:
            value, override = getattr(tier, name), getattr(key, name)
            limits[name] = str(value) if isinstance(value, Decimal) else value
            if override is not None:
                key_limits[name] = str(override) if isinstance(override, Decimal) else override
        if "max_tokens_cap" in key_limits:
            limits["max_tokens_cap"] = key_limits["max_tokens_cap"]
        models = key.allowed_models or tier.allowed_models or []
        if key.allowed_models and tier.allowed_models:  # a key narrows its tier, never widens it
            models = [m for m in key.allowed_models if m in tier.allowed_models] or ["-none-"]
        return cls(
            key_id=key.pk,
            key_prefix=key.prefix,
            tenant_id=key.tenant_id,
            tenant_slug=key.tenant.slug,
            tier=tier.name,
            store_content=key.tenant.store_content,
            expires_at=key.expires_at.timestamp() if key.expires_at else None,
            allowed_models=tuple(models),
            key_limits=key_limits,
            **limits,
        )
