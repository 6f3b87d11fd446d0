"""A rolling deploy: an old worker meets a step it does not have and leaves it to a new one."""

from __future__ import annotations

import pytest

from sagas.models import AuditEntry
from sagas.services import start
from tests.engine.conftest import terminal, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_an_old_worker_hands_a_new_step_to_a_worker_that_has_it(workers):
    # The old worker's deploy does not have the saga at all yet; the new one does.
    # Enough hand-backs (1+2+4+8+16 s) for the new worker to boot on a loaded machine.
    old = workers("old", SAGA_MODULES="sagas.examples.chaos", SAGAS_CODE_REQUEUES="5")
    task, _ = start("flaky-service", {})
    handed_back = wait_for(
        lambda: AuditEntry.objects.filter(task=task, action="code_missing").first(),
        30,
        message="the old worker never saw the job",
    )
    assert handed_back.details["worker"].startswith("old-")
    task.refresh_from_db()
    assert task.status == "pending"  # not dead-lettered by a worker that merely lacks it
    workers("new")
    wait_for(lambda: terminal(task), 60, message="the new worker never ran it")
    assert task.status == "completed"
    step = task.steps.get()
    assert step.attempt_count == 1
    assert step.attempts.get().worker.startswith("new-")
    assert old.log_path is not None
    assert "does not have step call_service" in old.log_path.read_text()
