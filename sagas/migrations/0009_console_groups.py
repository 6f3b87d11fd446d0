"""The console's two groups: ``Saga viewers`` see, ``Saga operators`` see and act."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEW = [
    "view_taskinstance",
    "view_steprecord",
    "view_stepattempt",
    "view_auditentry",
]
ACT = [
    "cancel_taskinstance",
    "resolve_taskinstance",
    "redrive_taskinstance",
    "reset_breaker",
    "release_lock",
]
GROUPS = {"Saga viewers": VIEW, "Saga operators": VIEW + ACT}


def create_groups(apps: Any, schema_editor: Any) -> None:
    # Django creates permissions only after the last migration; the groups need them now.
    for app_config in apps.get_app_configs():
        # create_permissions skips apps without a models module, which a migration's
        # historical app configs never have: pretend, then put back what was there.
        models_module = getattr(app_config, "models_module", None)
        app_config.models_module = models_module or True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = models_module
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


def remove_groups(apps: Any, schema_editor: Any) -> None:
    apps.get_model("auth", "Group").objects.filter(name__in=GROUPS).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("sagas", "0008_console_permissions"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
