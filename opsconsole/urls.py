from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from sagas import api

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/sagas/taskinstance/", permanent=False)),
    # The console's pages that belong to no model, before the admin's own URLs.
    path("admin/sagas/", include("sagas.views.urls")),
    path("admin/", admin.site.urls),
    path("api/health", api.health_view, name="api-health"),
    path("api/openapi.json", api.openapi_view, name="api-openapi"),
    path("api/distributed-tasks/<str:saga>/", api.tasks, name="api-tasks"),
    path("api/distributed-tasks/<str:saga>/<str:task_id>", api.task, name="api-task"),
    path(
        "api/distributed-tasks/<str:saga>/<str:task_id>/resolve",
        api.resolve_task,
        name="api-task-resolve",
    ),
    path(
        "api/distributed-tasks/<str:saga>/<str:task_id>/retry-compensation",
        api.retry_task_compensation,
        name="api-task-retry-compensation",
    ),
    path(
        "api/distributed-tasks/<str:saga>/<str:task_id>/redrive",
        api.redrive_task,
        name="api-task-redrive",
    ),
    # Anything else under /api/ is a JSON 404, with or without a trailing slash, DEBUG or not.
    re_path(r"^api(?:/|$)", api.not_found),
]

# JSON under /api/, Django's default pages elsewhere.
handler400 = "sagas.api_errors.bad_request"
handler403 = "sagas.api_errors.permission_denied"
handler404 = "sagas.api_errors.page_not_found"
handler500 = "sagas.api_errors.server_error"
