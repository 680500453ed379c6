"""What the gateway needs to know about a caller, resolved from a key, cheap to cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    max_tokens_cap: int | None

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
        """Key overrides win over the tier's values, field by field."""
        tier = key.tenant.tier
        limits = {}
        for name in LimitFields.LIMIT_NAMES:
            value = getattr(key, name)
            if value is None:
                value = getattr(tier, name)
            if isinstance(value, Decimal):
                value = str(value)
            limits[name] = value
        models = key.allowed_models or tier.allowed_models or []
        return cls(
            key_id=key.pk,
            key_prefix=key.prefix,
            tenant_id=key.tenant_id,
            tenant_slug=key.tenant.slug,
            tier=tier.name,
            store_content=key.tenant.store_content,
            expires_at=key.expires_at.timestamp() if key.expires_at else None,
            allowed_models=tuple(models),
            **limits,
        )
