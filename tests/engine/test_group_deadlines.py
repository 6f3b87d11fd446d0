"""A group's timeout counts from its first branch's start, not from the queue; its
schedule-to-close cap counts queue time too. One busy worker shows the difference."""

from __future__ import annotations

import pytest

from sagas.models import StepAttempt
from sagas.services import start
from tests.engine.conftest import terminal, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def busy_worker(workers):
    """One worker, kept busy for 3 s by another task before the group's task starts."""
    workers("only")
    blocker, _ = start("occupier", {"ms": 3000})
    wait_for(
        lambda: StepAttempt.objects.filter(step__task=blocker, outcome="running").exists(),
        30,
        message="the worker never got busy",
    )
    return blocker


def test_queue_time_does_not_count_against_a_groups_timeout(workers):
    busy_worker(workers)
    # quotes: timeout_s=4; two branches of 1 s each, one after the other on one worker,
    # after 3 s in the queue.
    task, _ = start("quotes-from-start", {})
    wait_for(lambda: terminal(task), 60, message="the task did not finish")
    assert task.status == "completed"
    group = task.steps.get(name="quotes")
    assert group.data == {"quote_a": {"quote": "a"}, "quote_b": {"quote": "b"}}
    first_start = min(
        StepAttempt.objects.filter(step__task=task).values_list("started_at", flat=True)
    )
    assert group.started_at is not None and group.deadline_at is not None
    assert (first_start - group.started_at).total_seconds() > 2  # it waited in the queue
    assert abs((group.deadline_at - first_start).total_seconds() - 4) < 1


def test_a_schedule_to_close_cap_counts_the_queue_and_times_the_branches_out(workers):
    busy_worker(workers)
    # quotes: timeout_s=10 but schedule_to_close_s=2, and the worker is busy for 3 s.
    task, _ = start("quotes-capped", {})
    wait_for(lambda: terminal(task), 60, message="the task did not finish")
    assert task.status == "compensated"  # an "all" group that failed; nothing to undo
    assert not StepAttempt.objects.filter(step__task=task).exists()  # nothing was tried
    first = task.steps.get(name="capped_a")
    assert first.status == "failed"
    assert first.error.startswith("timed out")
    # The group failed with its first branch; the other was not started any more.
    assert task.steps.get(name="capped_b").status == "skipped"
    assert task.steps.get(name="quotes").status == "failed"
