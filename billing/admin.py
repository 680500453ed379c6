from django.contrib import admin

from .models import BudgetAlert, UsageRecord


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "key_prefix", "model", "provider", "prompt_tokens",
                    "completion_tokens", "cost_usd", "latency_ms", "http_status", "stream", "partial")
    list_filter = ("tenant", "model", "provider", "http_status", "stream")
    search_fields = ("request_id", "provider_request_id", "end_user", "feature")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in UsageRecord._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(BudgetAlert)
class BudgetAlertAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "scope", "api_key", "period", "threshold", "spent_usd", "cap_usd",
                    "delivered_at")
    list_filter = ("threshold", "scope", "tenant")
    readonly_fields = [f.name for f in BudgetAlert._meta.fields]

    def has_add_permission(self, request):
        return False
