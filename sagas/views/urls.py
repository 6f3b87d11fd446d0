"""Console pages placed before the admin's own URLs (one ``include()`` in the project)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from sagas.views import bulk, console

urlpatterns = [
    path("dashboard/", admin.site.admin_view(console.dashboard), name="sagas-dashboard"),
    path("inbox/", admin.site.admin_view(console.inbox), name="sagas-inbox"),
    path("breakers/", admin.site.admin_view(console.breakers), name="sagas-breakers"),
    path(
        "breakers/<str:name>/reset/",
        admin.site.admin_view(console.reset_breaker),
        name="sagas-breaker-reset",
    ),
    path("locks/", admin.site.admin_view(console.locks), name="sagas-locks"),
    path("locks/release/", admin.site.admin_view(console.release_lock), name="sagas-lock-release"),
    path("bulk/<int:pk>/", admin.site.admin_view(bulk.progress), name="sagas-bulk-progress"),
]
