"""The audit trail cannot be rewritten: PROTECT on Django's side, a trigger on Postgres's."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.db.models import ProtectedError
from django.db.utils import DatabaseError

from sagas.audit import rewrite_allowed
from sagas.models import AuditEntry, TaskInstance
from sagas.services import start

pytestmark = pytest.mark.django_db


def test_deleting_a_task_with_history_is_refused():
    task, _ = start("chaos", {})
    with pytest.raises(ProtectedError):
        task.delete()
    assert TaskInstance.objects.filter(pk=task.pk).exists()


def test_deleting_a_user_with_audit_entries_is_refused(operator):
    start("chaos", {}, actor=operator)
    with pytest.raises(ProtectedError):
        operator.delete()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE sagas_auditentry SET action = 'tampered'",
        "DELETE FROM sagas_auditentry",
        "TRUNCATE sagas_auditentry CASCADE",
    ],
)
def test_the_trigger_refuses_rewriting_the_audit_table(statement):
    task, _ = start("chaos", {})
    with pytest.raises(DatabaseError, match=r"append-only: (UPDATE|DELETE|TRUNCATE) refused"):
        with transaction.atomic(), connection.cursor() as cursor:
            # Fire the pending foreign-key checks first, or TRUNCATE refuses for that reason.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute(statement)
    assert AuditEntry.objects.get(task=task).action == "started"


@pytest.mark.postgres
def test_the_orm_cannot_rewrite_it_either():
    task, _ = start("chaos", {})
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEntry.objects.filter(task=task).update(action="tampered")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEntry.objects.filter(task=task)._raw_delete(AuditEntry.objects.db)


@pytest.mark.postgres
def test_the_deliberate_setting_lifts_the_guard_for_one_transaction_only():
    task, _ = start("chaos", {})
    with rewrite_allowed():
        AuditEntry.objects.filter(task=task).update(details={"redacted": True})
    assert AuditEntry.objects.get(task=task).details == {"redacted": True}
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEntry.objects.filter(task=task).update(details={})
