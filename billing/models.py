"""One row per call: what was used, what it cost, how long it took, who to attribute it to."""

from django.db import models


class UsageRecord(models.Model):
    request_id = models.CharField(max_length=128, unique=True)  # dedupes at-least-once delivery
    provider_request_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(db_index=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="usage")
    api_key = models.ForeignKey("tenants.ApiKey", on_delete=models.SET_NULL, null=True, related_name="usage")
    key_prefix = models.CharField(max_length=32, blank=True)
    provider = models.CharField(max_length=32, blank=True)
    model = models.CharField(max_length=200)  # public name asked for
    upstream_model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cache_creation_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=18, decimal_places=10, default=0)
    ttft_ms = models.FloatField(null=True, blank=True)
    latency_ms = models.FloatField()
    finish_reason = models.CharField(max_length=32, blank=True)
    http_status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    stream = models.BooleanField(default=False)
    partial = models.BooleanField(default=False, help_text="The stream ended early (client left or upstream broke).")
    retries = models.PositiveSmallIntegerField(default=0)
    end_user = models.CharField(max_length=256, blank=True)  # the request's `user` field
    feature = models.CharField(max_length=64, blank=True)  # metadata.feature or X-Feature
    front_door = models.CharField(max_length=16, default="rest")
    prompt = models.JSONField(null=True, blank=True)  # only when the tenant stores content
    completion = models.TextField(blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "created_at"]),
            models.Index(fields=["tenant", "feature", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.cost_usd}"


class BudgetAlert(models.Model):
    """A tenant's (or key's) spend crossed 80% or 100% of a cap; recorded once per period."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="budget_alerts")
    scope = models.CharField(max_length=16)  # "tenant" or "key"
    # The key whose own cap it is (scope "key"); none for the tenant's cap. Each key's cap
    # alerts once per period, however many of the tenant's keys cross theirs.
    api_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.CASCADE,
                                related_name="budget_alerts")
    period = models.CharField(max_length=16)  # "2026-11-22" (daily) or "2026-11" (monthly)
    threshold = models.PositiveSmallIntegerField()  # 80 or 100
    spent_usd = models.DecimalField(max_digits=18, decimal_places=9)
    cap_usd = models.DecimalField(max_digits=18, decimal_places=9)
    request_id = models.CharField(max_length=128, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)  # set by the webhook sender (later)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "scope", "api_key", "period", "threshold"], nulls_distinct=False,
                                    name="one_alert_per_cap_and_period"),
        ]

    def __str__(self) -> str:
        scope = f"key {self.api_key_id}" if self.api_key_id else self.scope
        return f"{self.tenant_id} {scope} {self.period} {self.threshold}%"
