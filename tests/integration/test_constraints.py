"""Database constraints that back the engine's promises."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.services import start

pytestmark = pytest.mark.django_db


@pytest.fixture
def step():
    task, _ = start("chaos", {})
    return StepRecord.objects.get(task=task, name="charge")


def attempt(step, number, outcome="failed", kind="action"):
    return StepAttempt.objects.create(step=step, kind=kind, number=number, outcome=outcome)


def test_attempt_numbers_are_unique_per_step_and_kind(step):
    attempt(step, 1)
    attempt(step, 1, kind="compensation")  # another kind may reuse the number
    with pytest.raises(IntegrityError), transaction.atomic():
        attempt(step, 1)


def test_at_most_one_succeeded_attempt_per_step_and_kind(step):
    attempt(step, 1, "failed")
    attempt(step, 2, "succeeded")
    attempt(step, 1, "succeeded", kind="compensation")
    with pytest.raises(IntegrityError), transaction.atomic():
        attempt(step, 3, "succeeded")
    # A later attempt that is still running is fine; it is its success that is refused.
    running = attempt(step, 3, "running")
    with pytest.raises(IntegrityError), transaction.atomic():
        StepAttempt.objects.filter(pk=running.pk).update(outcome="succeeded")
    assert step.attempts.filter(outcome="succeeded").count() == 2


def test_business_key_is_unique_per_saga_in_the_database():
    start("chaos", {}, business_key="k-1")
    with pytest.raises(IntegrityError), transaction.atomic():
        TaskInstance.objects.create(saga="chaos", business_key="k-1", trace_id="0" * 32)
    # Tasks without a key never collide.
    TaskInstance.objects.create(saga="chaos", trace_id="1" * 32)
    TaskInstance.objects.create(saga="chaos", trace_id="2" * 32)


def test_progress_is_a_percentage(step):
    with pytest.raises(IntegrityError), transaction.atomic():
        StepRecord.objects.filter(pk=step.pk).update(progress=101)
