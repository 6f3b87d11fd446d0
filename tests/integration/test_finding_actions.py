"""An operator's actions on findings, each checked again when it runs, against moto's S3
server over HTTP and the suite's real Redis; and the same actions as bulk operations."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.test import Client

from sagas import bulk, finding_actions, reconciliation
from sagas.examples.create_zip import create_zip
from sagas.models import AuditEntry, BulkOperation, Finding, ReconciliationRun
from sagas.services import NothingToDo
from tests.conftest import console_group
from tests.integration.test_reconciliation import keys, put, s3, step_owning

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_redis")]

__all__ = ["s3"]  # the per-test bucket fixture

NOTE = "ticket OPS-42: orphans of the 2 a.m. crash"
OLD = "create-zip/old.zip"
OTHER = "create-zip/other.zip"


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user("finding-operator", is_staff=True)
    user.groups.add(console_group("Saga operators"))
    return user


@pytest.fixture
def orphans(s3, monkeypatch):
    """Two orphans a dry run recorded; the saga's grace is one second, so both are old."""
    monkeypatch.setattr(create_zip, "orphan_grace", timedelta(seconds=1))
    put(s3, OLD)
    put(s3, OTHER)
    scope = reconciliation.scope_for("create-zip", timedelta(0))
    run = reconciliation.reconcile(scope)
    assert run is not None and run.status == "succeeded"
    return {f.key: f for f in Finding.objects.filter(kind="orphan_object")}


def _wait_past_grace() -> None:
    import time

    time.sleep(2.1)  # S3 keeps whole seconds; the saga's grace is one


def test_deleting_an_orphan_checks_it_again_and_audits_who_and_why(s3, orphans, operator):
    _wait_past_grace()
    finding = orphans[OLD]
    done = finding_actions.act("delete_object", finding.pk, operator, NOTE)
    assert done == f"deleted {OLD}"
    assert OLD not in keys(s3) and OTHER in keys(s3)
    finding.refresh_from_db()
    assert (finding.state, finding.acted_by, finding.acted_by_name) == (
        "deleted",
        operator,
        operator.username,
    )
    entry = AuditEntry.objects.get(action="orphan_deleted", details__key=OLD)
    assert (entry.actor, entry.details["note"], entry.details["policy"]) == (
        operator,
        NOTE,
        "delete",
    )


def test_archiving_copies_under_the_archive_prefix_then_deletes(s3, orphans, operator):
    _wait_past_grace()
    finding_actions.act("archive_object", orphans[OLD].pk, operator, "")
    assert OLD not in keys(s3)
    assert settings.SAGAS_ARCHIVE_PREFIX + OLD in keys(s3)
    assert Finding.objects.get(pk=orphans[OLD].pk).state == "archived"


def test_a_key_that_a_step_owns_by_now_is_kept_and_its_finding_resolved(s3, orphans, operator):
    _wait_past_grace()
    step_owning(OLD)
    with pytest.raises(NothingToDo, match="a step owns the key now"):
        finding_actions.act("delete_object", orphans[OLD].pk, operator, NOTE)
    assert OLD in keys(s3)
    assert Finding.objects.get(pk=orphans[OLD].pk).state == "resolved"


def test_an_object_younger_than_the_grace_its_run_used_is_kept(s3, orphans, operator):
    finding = orphans[OLD]
    # As if found by a run with a 48 h grace (``reconcile --grace 48h``) when it was older.
    finding.details = {**finding.details, "grace_s": 48 * 3600}
    finding.save(update_fields=["details"])
    with pytest.raises(NothingToDo, match="younger than the orphan grace"):
        finding_actions.act("delete_object", finding.pk, operator, NOTE)
    assert OLD in keys(s3)
    assert Finding.objects.get(pk=finding.pk).state == "open"


def test_without_a_recorded_grace_the_sagas_own_applies(s3, orphans, operator, monkeypatch):
    monkeypatch.setattr(create_zip, "orphan_grace", timedelta(hours=48))
    finding = orphans[OLD]
    finding.details = {k: v for k, v in finding.details.items() if k != "grace_s"}
    finding.save(update_fields=["details"])
    with pytest.raises(NothingToDo, match="younger than the orphan grace"):
        finding_actions.act("archive_object", finding.pk, operator, NOTE)
    assert OLD in keys(s3)


def test_ignore_then_reopen_and_what_does_not_apply_changes_nothing(s3, orphans, operator):
    finding = orphans[OLD]
    assert finding_actions.act("ignore_finding", finding.pk, operator, NOTE) == f"ignored {OLD}"
    with pytest.raises(NothingToDo, match="the finding is ignored, of kind orphan_object"):
        finding_actions.act("delete_object", finding.pk, operator, NOTE)
    with pytest.raises(NothingToDo, match="applies to open findings of kind stale_lock"):
        finding_actions.act("release_lock", finding.pk, operator, NOTE)
    finding_actions.act("reopen_finding", finding.pk, operator, "")
    assert Finding.objects.get(pk=finding.pk).state == "open"
    assert list(
        AuditEntry.objects.filter(details__finding=finding.pk)
        .order_by("id")
        .values_list("action", "actor_name")
    ) == [("finding_ignored", operator.username), ("finding_reopened", operator.username)]
    assert OLD in keys(s3)
    with pytest.raises(NothingToDo, match="no such finding"):
        finding_actions.act("ignore_finding", "not-a-number", operator, NOTE)


def test_a_bulk_delete_acts_on_each_finding_and_counts_what_it_skipped(s3, orphans, operator):
    _wait_past_grace()
    finding_actions.act("ignore_finding", orphans[OTHER].pk, operator, "")
    ids = [orphans[OLD].pk, orphans[OTHER].pk]
    operation = bulk.start_bulk("delete_object", ids, operator, NOTE)
    bulk.run_bulk(operation.pk)
    operation.refresh_from_db()
    assert (operation.status, operation.succeeded, operation.skipped) == ("done", 1, 1)
    (skipped,) = operation.skipped_examples
    assert skipped.startswith(f"{orphans[OTHER].pk}: the finding is ignored")
    assert keys(s3, "create-zip/") == {OTHER}


def test_the_findings_list_previews_a_bulk_action_and_starts_it(s3, orphans, operator):
    client = Client()
    client.force_login(operator)
    ids = [str(f.pk) for f in orphans.values()]
    form = {"action": "archive_object", "_selected_action": ids}
    page = client.post("/admin/sagas/finding/", form).content.decode()
    assert 'id="bulk-count">2<' in page
    assert "orphan_object · open" in page
    assert keys(s3, "create-zip/") == {OLD, OTHER}  # a preview changes nothing
    response = client.post("/admin/sagas/finding/", {**form, "post": "yes", "note": NOTE})
    operation = BulkOperation.objects.get()
    assert response["Location"] == f"/admin/sagas/bulk/{operation.pk}/"
    assert (operation.action, operation.total, operation.note) == ("archive_object", 2, NOTE)


def test_start_a_run_now_queues_one_job_and_says_so_when_one_runs(operator, s3):
    client = Client()
    client.force_login(operator)
    response = client.post("/admin/sagas/reconciliationrun/start/", {"apply": "on"}, follow=True)
    assert "A reconciliation run (applying each saga&#x27;s policy) is queued" in (
        response.content.decode()
    )
    from sagas.engine.connection import queue

    (job,) = queue().get_jobs()
    assert job.func_name == reconciliation.CONSOLE_JOB
    assert job.args == (operator.pk, True)
    reconciliation.console_run(*job.args)
    run = ReconciliationRun.objects.get()
    assert (run.trigger, run.actor, run.applied, run.status) == (
        "console",
        operator,
        True,
        "succeeded",
    )
    blocker = reconciliation.start_run(reconciliation.scope_for(), trigger="command", applied=False)
    assert blocker is not None
    page = client.post("/admin/sagas/reconciliationrun/start/", follow=True).content.decode()
    assert f"No run started: run #{blocker.pk} is in progress" in page
    assert len(queue().get_jobs()) == 1
