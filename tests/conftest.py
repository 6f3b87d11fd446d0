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
def empty_redis():
    """The suite's private Redis (tests/environment.py), empty before and after the test:
    queues, breakers, locks and claims of one test never reach the next."""
    from sagas.engine.connection import redis

    redis().flushdb()
    yield
    redis().flushdb()


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server over HTTP for the whole run, with the bucket ``opsconsole-test``."""
    from sagas.embedded import EmbeddedS3

    server = EmbeddedS3("opsconsole-test")
    yield server
    server.stop()


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


def console_group(name: str):
    """The group migrations 0009 and 0013 create; made again if a transactional test's flush
    took it (data from migrations does not survive TransactionTestCase's flush)."""
    import importlib

    from django.apps import apps
    from django.contrib.auth.models import Group

    if not Group.objects.filter(name=name).exists():
        importlib.import_module("sagas.migrations.0009_console_groups").create_groups(apps, None)
        reconciliation = importlib.import_module(
            "sagas.migrations.0013_reconciliation_groups_and_owned_keys"
        )
        reconciliation.add_permissions(apps, None)
    return Group.objects.get(name=name)


@pytest.fixture
def saga_operator(django_user_model):
    """A staff user in the ``Saga operators`` group: may see and act."""
    user = django_user_model.objects.create_user("op", password="pw-op-123456", is_staff=True)
    user.groups.add(console_group("Saga operators"))
    return user


@pytest.fixture
def saga_viewer(django_user_model):
    """A staff user in the ``Saga viewers`` group: may see, not act."""
    user = django_user_model.objects.create_user("viewer", password="pw-view-12345", is_staff=True)
    user.groups.add(console_group("Saga viewers"))
    return user
