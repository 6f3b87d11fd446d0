from __future__ import annotations

import pytest
from django.db import connection


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if connection.vendor == "postgresql":
        return
    skip = pytest.mark.skip(
        reason="needs Postgres (set DATABASE_URL; CI does): row locks, triggers or forked workers"
    )
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def operator(django_user_model):
    """A staff user with the view and cancel permissions an on-call operator has."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("oncall", password="pw-oncall-123", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="sagas",
            codename__in=[
                "view_taskinstance",
                "view_steprecord",
                "view_auditentry",
                "cancel_taskinstance",
            ],
        )
    )
    return user
