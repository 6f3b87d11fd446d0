"""Migration 0013: the groups' reconciliation permissions and the owned-keys backfill."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps
from django.contrib.auth.models import Group

from sagas.models import OwnedKey, StepRecord, TaskInstance

MIGRATION = importlib.import_module("sagas.migrations.0013_reconciliation_groups_and_owned_keys")


@pytest.mark.django_db
def test_the_groups_get_the_reconciliation_permissions():
    def codenames(name: str) -> set[str]:
        group = Group.objects.get(name=name)
        return set(group.permissions.values_list("codename", flat=True))

    assert {"view_finding", "view_reconciliationrun"} <= codenames("Saga viewers")
    assert "act_on_finding" not in codenames("Saga viewers")
    assert {"view_finding", "view_reconciliationrun", "act_on_finding"} <= codenames(
        "Saga operators"
    )


@pytest.mark.django_db
def test_the_backfill_owns_the_keys_of_steps_recorded_before_it(monkeypatch):
    monkeypatch.setattr(MIGRATION, "BATCH", 2)
    task = TaskInstance.objects.create(saga="create-zip", status="completed", trace_id="0" * 32)

    def step(index: int, status: str, data: object) -> None:
        StepRecord.objects.create(
            task=task, index=index, name=f"s{index}", status=status, data=data
        )

    step(0, "succeeded", {"Key": "create-zip/a.zip"})
    step(1, "succeeded", {"Keys": ["create-zip/b c.zip", "create-zip/ü.zip"]})
    step(2, "compensated", {"Key": "create-zip/undone.zip"})
    step(3, "succeeded", None)
    step(4, "compensation_failed", {"Key": "create-zip/kept.zip"})
    MIGRATION.backfill_owned_keys(apps, None)
    MIGRATION.backfill_owned_keys(apps, None)  # twice is harmless
    assert sorted(OwnedKey.objects.values_list("key", "saga")) == [
        ("create-zip/a.zip", "create-zip"),
        ("create-zip/b c.zip", "create-zip"),
        ("create-zip/kept.zip", "create-zip"),
        ("create-zip/ü.zip", "create-zip"),
    ]
