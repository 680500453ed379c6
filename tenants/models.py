"""Tenants, their tiers (the limits later enforced) and their API keys (stored hashed)."""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib
from datetime import timedelta
from decimal import Decimal

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

KEY_PREFIX = "sk-gw-"
PREFIX_LENGTH = len(KEY_PREFIX) + 8  # the visible part that identifies a key


_BASE62 = string.digits + string.ascii_letters
_RANDOM_LENGTH = 43  # secrets.token_urlsafe(32)
CHECKSUM_LENGTH = 6


def key_checksum(body: str) -> str:
    """CRC32 of the key's body in 6 base62 characters (as GitHub's tokens): a mistyped or
    made-up key is refused without a lookup, so bad keys never wait on the database."""
    value, out = zlib.crc32(body.encode()), []
    for _ in range(CHECKSUM_LENGTH):
        value, digit = divmod(value, 62)
        out.append(_BASE62[digit])
    return "".join(reversed(out))


def key_is_plausible(secret: str) -> bool:
    """Could this be a key we issued? Keys issued before checksums (no suffix) must be looked up."""
    if len(secret) == len(KEY_PREFIX) + _RANDOM_LENGTH:
        return True
    body = secret[:-CHECKSUM_LENGTH]
    return len(secret) == len(KEY_PREFIX) + _RANDOM_LENGTH + CHECKSUM_LENGTH and secret[-CHECKSUM_LENGTH:] == key_checksum(body)


def hash_key(secret: str) -> str:
    """Keys carry 256 bits of entropy, so one SHA-256 is enough (no slow KDF on the hot path)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class LimitFields(models.Model):
    """The limit fields a tier sets and a key may override (null on a key = use the tier's)."""

    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    requests_per_hour = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_concurrent = models.PositiveIntegerField(null=True, blank=True)
    daily_budget_usd = models.DecimalField(
        max_digits=14, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    monthly_budget_usd = models.DecimalField(
        max_digits=14, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    max_tokens_cap = models.PositiveIntegerField(
        null=True, blank=True, help_text="Largest max_tokens a request may ask for."
    )
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Public model names; empty means every model."
    )

    LIMIT_NAMES = (
        "requests_per_minute",
        "requests_per_hour",
        "tokens_per_minute",
        "max_concurrent",
        "daily_budget_usd",
        "monthly_budget_usd",
        "max_tokens_cap",
    )

    class Meta:
        abstract = True


class Tier(LimitFields):
    """A named bundle of limits; blank limits are unlimited."""

    name = models.SlugField(unique=True)
    description = models.CharField(max_length=200, blank=True)

    GENEROUS_DEFAULTS = {
        "requests_per_minute": 600,
        "requests_per_hour": 20_000,
        "tokens_per_minute": 1_000_000,
        "max_concurrent": 50,
        "daily_budget_usd": Decimal("100"),
        "monthly_budget_usd": Decimal("1000"),
        "max_tokens_cap": 32_768,
    }

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    slug = models.SlugField(unique=True, validators=[RegexValidator(r"^[a-z0-9][a-z0-9-]*$")])
    name = models.CharField(max_length=200)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="tenants")
    is_active = models.BooleanField(default=True)
    store_content = models.BooleanField(
        default=False, help_text="Store prompts and answers with usage rows (off by default)."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug


class ApiKeyQuerySet(models.QuerySet):
    def active(self):
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiKey(LimitFields):
    """A tenant's secret key. Only its hash is stored; the prefix identifies it to humans."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant.slug})" if self.tenant_id else self.prefix

    @staticmethod
    def generate() -> tuple[str, str, str]:
        """A fresh (secret, prefix, hash)."""
        body = KEY_PREFIX + secrets.token_urlsafe(32)
        secret = body + key_checksum(body)
        return secret, secret[:PREFIX_LENGTH], hash_key(secret)

    @classmethod
    def issue(
        cls, tenant: Tenant, name: str = "", expires_in_days: int | None = None
    ) -> tuple[ApiKey, str]:
        """Create a key and return it with its secret, which is never retrievable again."""
        secret, prefix, hashed = cls.generate()
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        key = cls.objects.create(
            tenant=tenant, name=name, prefix=prefix, hashed_key=hashed, expires_at=expires_at
        )
        return key, secret

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()
