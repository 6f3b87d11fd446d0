"""resolve, retry_compensation and redrive: operator actions with actor and reason audited."""

from __future__ import annotations

from typing import Any

import pytest

from sagas.models import AuditEntry
from sagas.services import (
    ActionNotAllowed,
    InvalidInput,
    TaskNotFound,
    redrive,
    resolve,
    retry_compensation,
    start,
)
from sagas.signals import compensation_failed
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fired():
    received = []

    def receiver(sender, task, failed_steps, **kwargs):
        received.append((task.pk, [s.name for s in failed_steps]))

    compensation_failed.connect(receiver)
    yield received
    compensation_failed.disconnect(receiver)


def test_compensation_failed_fires_the_signal_once_and_mails_admins(fired, mailoutbox, settings):
    settings.ADMINS = [("Ops", "ops@example.com")]
    task, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    task = run_to_end(task)
    assert task.status == "compensation_failed"
    assert fired == [(task.pk, ["reserve"])]
    assert len(mailoutbox) == 1
    assert str(task.pk) in mailoutbox[0].subject


def test_retry_compensation_of_a_now_working_compensation_ends_compensated(operator, fired):
    # The first three compensation attempts of reserve fail: exactly its budget.
    task, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": 3}})
    task = run_to_end(task)
    assert task.status == "compensation_failed"
    retry_compensation(task.pk, operator, "payments API is back")
    task = run_to_end(task)
    assert task.status == "compensated"
    reserve = task.steps.get(name="reserve")
    assert reserve.status == "compensated"
    assert reserve.compensation_attempt_count == 4
    entry = AuditEntry.objects.get(task=task, action="compensation_retried")
    assert (entry.actor, entry.details["reason"]) == (operator, "payments API is back")
    assert len(fired) == 1


def test_redrive_of_a_dead_lettered_task_completes_with_continued_attempt_numbers(operator):
    task, _ = start("chaos", {"fail": {"charge": 4}, "on_exhausted": "dead_letter"})
    task = run_to_end(task)
    assert task.status == "dead_lettered"
    redrive(task.pk, operator, "fixed the card processor")
    task = run_to_end(task)
    assert task.status == "completed"
    charge = task.steps.get(name="charge")
    assert charge.attempt_count == 5
    assert list(charge.attempts.values_list("number", "outcome")) == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
        (4, "failed"),
        (5, "succeeded"),
    ]
    entry = AuditEntry.objects.get(task=task, action="redriven")
    assert (entry.actor, entry.details["reason"]) == (operator, "fixed the card processor")


def test_resolve_needs_a_note_and_a_parked_task(operator):
    task, _ = start("chaos", {"fail": {"charge": -1}, "on_exhausted": "fail"})
    task = run_to_end(task)
    assert task.status == "failed"
    with pytest.raises(InvalidInput, match="note is required"):
        resolve(task.pk, operator, "  ")
    resolve(task.pk, operator, "refunded by hand, ticket OPS-12")
    task.refresh_from_db()
    assert (task.status, task.resolved_by, task.resolution_note) == (
        "resolved",
        operator,
        "refunded by hand, ticket OPS-12",
    )
    with pytest.raises(ActionNotAllowed, match="it is resolved"):
        resolve(task.pk, operator, "again")
    with pytest.raises(ActionNotAllowed, match="only dead_lettered"):
        redrive(task.pk, operator, "why not")
    with pytest.raises(TaskNotFound):
        retry_compensation("00000000-0000-0000-0000-000000000000", operator, "x")
    with pytest.raises(TaskNotFound):
        resolve("not-a-uuid", operator, "x")


def test_compensation_failed_posts_the_webhook_once(settings):
    import http.server
    import json
    import threading

    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.headers["Content-Type"] == "application/json"
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.SAGAS_COMPENSATION_FAILED_WEBHOOK = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        task, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
        task = run_to_end(task)
    finally:
        server.shutdown()
        server.server_close()
    assert task.status == "compensation_failed"
    assert len(received) == 1
    assert received[0]["event"] == "compensation_failed"
    assert received[0]["task_id"] == str(task.pk)
    assert [s["name"] for s in received[0]["steps"]] == ["reserve"]


def test_each_task_tells_only_of_its_own_failed_undos(fired):
    first, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    assert run_to_end(first).status == "compensation_failed"
    second, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"charge": -1}})
    assert run_to_end(second).status == "compensation_failed"
    assert fired == [(first.pk, ["reserve"]), (second.pk, ["charge"])]
