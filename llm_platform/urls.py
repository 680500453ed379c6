from django.contrib import admin
from django.urls import path

from gateway.api import django_views
from tenants.admin_login import admin_login

urlpatterns = [
    # Before admin.site.urls so it wins: the admin login, limited per client IP (429 past the rate).
    path("admin/login/", admin_login, name="admin-login-limited"),
    path("admin/", admin.site.urls),
    path("ready", django_views.ready),
    path("status", django_views.status),
]

handler404 = "gateway.api.django_views.handler404"
handler500 = "gateway.api.django_views.handler500"
