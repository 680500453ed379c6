"""Model routes: a public model name -> ordered lanes (provider, upstream model, prices)."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models

PROVIDERS = [
    ("openai", "OpenAI"),
    ("anthropic", "Anthropic"),
    ("openai-compatible", "OpenAI-compatible server"),
    ("local", "Built-in local model"),
]

_ENV_NAME = RegexValidator(r"^[A-Z_][A-Z0-9_]*$", "an environment variable's name, e.g. OPENAI_API_KEY")
_PRICE = dict(max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(0)])


class ModelRoute(models.Model):
    model = models.CharField(max_length=200, unique=True, help_text="The public name tenants ask for.")
    description = models.CharField(max_length=200, blank=True)
    is_enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.model


class Lane(models.Model):
    """One way to serve a route; lanes are tried in `position` order."""

    route = models.ForeignKey(ModelRoute, on_delete=models.CASCADE, related_name="lanes")
    position = models.PositiveSmallIntegerField(default=0)
    provider = models.CharField(max_length=32, choices=PROVIDERS)
    upstream_model = models.CharField(max_length=200)
    base_url = models.URLField(blank=True, help_text="Blank = the provider's default.")
    api_key_env = models.CharField(
        max_length=100, blank=True, validators=[_ENV_NAME],
        help_text="Name of the environment variable holding the credential (never the secret).",
    )
    context_window = models.PositiveIntegerField(default=128_000)
    price_input = models.DecimalField(help_text="USD per million input tokens", **_PRICE)
    price_output = models.DecimalField(help_text="USD per million output tokens", **_PRICE)
    price_cached_input = models.DecimalField(help_text="USD per million cached input tokens", **_PRICE)
    options = models.JSONField(default=dict, blank=True, help_text="Provider options, e.g. tokens_per_second for local.")

    class Meta:
        ordering = ["route", "position"]
        unique_together = [("route", "position")]

    def __str__(self) -> str:
        return f"{self.route.model}[{self.position}] {self.provider}:{self.upstream_model}"


class BreakerEvent(models.Model):
    """A lane's circuit breaker changed state (closed / open / half_open), and why."""

    lane = models.CharField(max_length=300)
    from_state = models.CharField(max_length=16)
    to_state = models.CharField(max_length=16)
    reason = models.CharField(max_length=300)
    at = models.DateTimeField(db_index=True)
    event_id = models.CharField(max_length=64, unique=True)  # the Redis stream id: retry-safe

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.lane}: {self.from_state} -> {self.to_state}"


class StoredResponse(models.Model):
    """A response of the OpenAI Responses API front door, kept (unless `store: false`) so that a
    follow-up can name it in `previous_response_id`, and `GET /v1/responses/{id}` can return it.

    `conversation` holds the whole exchange in the normalized message vocabulary (the history it
    continued, this turn's input and its output), so a follow-up is one primary-key read on any
    lane, whatever served the first turn."""

    id = models.CharField(primary_key=True, max_length=64)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="responses")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)
    model = models.CharField(max_length=200)
    previous_response_id = models.CharField(max_length=64, blank=True)
    body = models.JSONField()  # the Response object as the API returns it
    input_items = models.JSONField(default=list)  # this turn's input items, as sent
    conversation = models.JSONField(default=list)

    class Meta:
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return self.id
