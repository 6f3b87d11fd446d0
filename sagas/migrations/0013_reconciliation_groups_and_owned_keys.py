"""Reconciliation's permissions for the console groups, and the owned keys of existing steps."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEW = ["view_finding", "view_reconciliationrun"]
GROUPS = {"Saga viewers": VIEW, "Saga operators": [*VIEW, "act_on_finding"]}
BATCH = 2000


def _create_permissions(apps: Any) -> None:
    # As in 0009: a migration's historical app configs have no models module, which
    # create_permissions needs; lend one on the historical config only, then put it back.
    for app_config in apps.get_app_configs():
        models_module = getattr(app_config, "models_module", None)
        app_config.models_module = models_module or True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = models_module


def add_permissions(apps: Any, schema_editor: Any) -> None:
    _create_permissions(apps)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = Permission.objects.filter(
            content_type__app_label="sagas", codename__in=codenames
        )
        missing = set(codenames) - set(permissions.values_list("codename", flat=True))
        if missing:
            raise RuntimeError(f"permissions missing for {name}: {sorted(missing)}")
        group.permissions.add(*permissions)


def remove_permissions(apps: Any, schema_editor: Any) -> None:
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    permissions = Permission.objects.filter(
        content_type__app_label="sagas", codename__in=GROUPS["Saga operators"]
    )
    for group in Group.objects.filter(name__in=GROUPS):
        group.permissions.remove(*permissions)


def _keys_in(data: Any) -> list[str]:
    # A frozen copy of sagas.ownership.keys_in: migrations must not follow later code.
    if not isinstance(data, dict):
        return []
    found: list[Any] = [data.get("Key")]
    if isinstance(data.get("Keys"), list):
        found += data["Keys"]
    return list(dict.fromkeys(k for k in found if isinstance(k, str) and 0 < len(k) <= 1024))


def backfill_owned_keys(apps: Any, schema_editor: Any) -> None:
    StepRecord = apps.get_model("sagas", "StepRecord")
    OwnedKey = apps.get_model("sagas", "OwnedKey")
    steps = (
        StepRecord.objects.exclude(data=None)
        .exclude(status="compensated")
        .values_list("pk", "task__saga", "data")
    )
    batch = []
    for pk, saga, data in steps.iterator(chunk_size=BATCH):
        batch += [OwnedKey(step_id=pk, saga=saga, key=key) for key in _keys_in(data)]
        if len(batch) >= BATCH:
            OwnedKey.objects.bulk_create(batch, ignore_conflicts=True)
            batch = []
    OwnedKey.objects.bulk_create(batch, ignore_conflicts=True)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("sagas", "0012_reconciliation"),
    ]

    operations = [
        migrations.RunPython(add_permissions, remove_permissions),
        migrations.RunPython(backfill_owned_keys, migrations.RunPython.noop),
    ]
