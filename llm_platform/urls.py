from django.contrib import admin
from django.urls import path

from gateway.api import django_views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("ready", django_views.ready),
    path("status", django_views.status),
]

handler404 = "gateway.api.django_views.handler404"
handler500 = "gateway.api.django_views.handler500"
