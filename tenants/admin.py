from django.contrib import admin, messages

from .models import ApiKey, LimitFields, Tenant, Tier

LIMITS = (*LimitFields.LIMIT_NAMES, "allowed_models")


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ("name", "requests_per_minute", "tokens_per_minute", "max_concurrent",
                    "daily_budget_usd", "monthly_budget_usd")
    fieldsets = ((None, {"fields": ("name", "description")}), ("Limits", {"fields": LIMITS}))


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ("prefix", "name", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False  # keys are issued from the API key page, where the secret is shown once


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "tier", "is_active", "created_at")
    list_filter = ("tier", "is_active")
    search_fields = ("slug", "name")
    inlines = [ApiKeyInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "tenant", "name", "created_at", "expires_at", "revoked_at",
                    "last_used_at")
    list_filter = ("tenant",)
    search_fields = ("prefix", "name", "tenant__slug")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    actions = ["revoke_selected"]
    fieldsets = (
        (None, {"fields": ("tenant", "name", "prefix", "expires_at", "revoked_at",
                           "created_at", "last_used_at")}),
        ("Overrides of the tier's limits (blank = tier's)", {"fields": LIMITS}),
    )

    def save_model(self, request, obj, form, change):
        if not change:
            secret, obj.prefix, obj.hashed_key = ApiKey.generate()
            super().save_model(request, obj, form, change)
            messages.warning(
                request,
                f"New API key for {obj.tenant.slug}: {secret} (copy it now: it is shown only "
                "once and cannot be recovered).",
            )
            return
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke selected keys")
    def revoke_selected(self, request, queryset):
        for key in queryset:
            key.revoke()
        self.message_user(request, f"Revoked {queryset.count()} key(s).")
