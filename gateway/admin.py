from django.contrib import admin

from .models import BreakerEvent, Lane, ModelRoute


class LaneInline(admin.TabularInline):
    model = Lane
    extra = 0
    fields = ("position", "provider", "upstream_model", "base_url", "api_key_env",
              "context_window", "price_input", "price_output", "price_cached_input", "options")


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    list_display = ("model", "is_enabled", "lane_summary", "updated_at")
    list_filter = ("is_enabled",)
    search_fields = ("model",)
    inlines = [LaneInline]

    @admin.display(description="lanes")
    def lane_summary(self, obj):
        return " → ".join(f"{lane.provider}:{lane.upstream_model}" for lane in obj.lanes.all())


@admin.register(BreakerEvent)
class BreakerEventAdmin(admin.ModelAdmin):
    list_display = ("at", "lane", "from_state", "to_state", "reason")
    list_filter = ("to_state", "lane")
    readonly_fields = [f.name for f in BreakerEvent._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
