"""``start()``: one transaction for task, steps and audit; business-key semantics; clear errors."""

from __future__ import annotations

import threading

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from sagas.definitions import UnknownSaga
from sagas.models import AuditEntry, StepRecord, TaskInstance
from sagas.services import BusinessKeyConflict, InvalidInput, start

pytestmark = pytest.mark.django_db


def test_start_creates_the_task_its_steps_and_a_started_audit_entry(operator):
    task, created = start(
        "chaos", {"fail": {"charge": 2}}, correlation_id="order-77", actor=operator
    )
    assert created
    task.refresh_from_db()
    assert task.status == "pending"
    assert task.version == 0
    assert task.input == {"fail": {"charge": 2}}
    assert task.correlation_id == "order-77"
    assert len(task.trace_id) == 32 and int(task.trace_id, 16)
    steps = list(task.steps.order_by("index"))
    assert [(s.index, s.name, s.status) for s in steps] == [
        (0, "reserve", "pending"),
        (1, "charge", "pending"),
        (2, "ship", "pending"),
    ]
    assert all(s.trace_id == task.trace_id and len(s.span_id) == 16 for s in steps)
    entry = AuditEntry.objects.get(task=task)
    assert (entry.action, entry.actor, entry.actor_name) == ("started", operator, "oncall")
    assert entry.details["steps"] == ["reserve", "charge", "ship"]


def test_started_without_actor_is_recorded_as_system():
    task, _ = start("chaos", {})
    assert AuditEntry.objects.get(task=task).actor_name == "system"
    assert task.correlation_id  # generated when not given


def test_the_engine_is_handed_the_task_only_after_commit(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        start("chaos", {})
    assert len(callbacks) == 1


def test_same_business_key_and_input_returns_the_existing_task():
    first, created = start("chaos", {"fail": {"charge": 1}}, business_key="order-1")
    again, created_again = start("chaos", {"fail": {"charge": 1}}, business_key="order-1")
    assert created and not created_again
    assert again.pk == first.pk
    assert TaskInstance.objects.count() == 1
    assert StepRecord.objects.count() == 3


def test_same_business_key_with_another_input_conflicts_and_changes_nothing():
    first, _ = start("chaos", {}, business_key="order-2")
    with pytest.raises(BusinessKeyConflict, match="order-2") as excinfo:
        start("chaos", {"fail": {"ship": -1}}, business_key="order-2")
    assert excinfo.value.task.pk == first.pk
    assert TaskInstance.objects.count() == 1
    assert AuditEntry.objects.count() == 1


def test_a_replay_returns_its_task_even_after_validation_was_tightened(monkeypatch):
    from django.core.exceptions import ValidationError as DjangoValidationError

    from sagas.definitions import registry

    first, _ = start("chaos", {"fail": {"charge": 1}}, business_key="order-3")

    def reject_everything(task_input):
        raise DjangoValidationError("no more chaos")

    monkeypatch.setattr(registry.get("chaos"), "validate_input", reject_everything)
    again, created = start("chaos", {"fail": {"charge": 1}}, business_key="order-3")
    assert (again.pk, created) == (first.pk, False)
    with pytest.raises(InvalidInput, match="no more chaos"):
        start("chaos", {"fail": {"charge": 1}}, business_key="order-4")


def test_an_anonymous_actor_is_refused_not_recorded_as_system():
    from django.contrib.auth.models import AnonymousUser

    with pytest.raises(ValueError, match="anonymous user cannot act"):
        start("chaos", {}, actor=AnonymousUser())
    assert not TaskInstance.objects.exists()


def test_a_business_key_is_unique_per_saga_only():
    a, _ = start("chaos", {}, business_key="shared")
    b, created = start("create-zip", {"files": {"a.txt": "a"}}, business_key="shared")
    assert created and a.pk != b.pk


def test_unknown_saga():
    with pytest.raises(UnknownSaga, match="unknown saga 'nope'"):
        start("nope", {})
    assert not TaskInstance.objects.exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "input must be a JSON object, got list"),
        ("text", "input must be a JSON object, got str"),
        (None, "input must be a JSON object, got NoneType"),
        ({"when": object()}, "not JSON-serialisable"),
        ({"x": float("nan")}, "not JSON-serialisable"),
        ({1: {2}}, "not JSON-serialisable"),
        ({"note": "a\x00b"}, "contains a NUL character"),
        ({"note": "\ud800"}, "invalid Unicode character"),
    ],
)
def test_non_json_input_is_refused(value, message):
    with pytest.raises(InvalidInput, match=message):
        start("chaos", value)
    assert not TaskInstance.objects.exists()


def test_the_sagas_validate_input_rejects_with_its_messages():
    with pytest.raises(ValidationError) as excinfo:
        start("chaos", {"fail": {"charge": "twice", "teleport": 1}, "colour": "red"})
    messages = excinfo.value.messages
    assert "fail: unknown step 'teleport'" in messages
    assert "fail.charge must be an integer >= -1" in messages
    assert "unknown input key 'colour'" in messages
    with pytest.raises(InvalidInput, match="files"):
        start("create-zip", {"files": {}})
    assert not TaskInstance.objects.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"business_key": ""}, "business_key must be a non-empty string"),
        ({"business_key": 42}, "business_key must be a non-empty string"),
        ({"business_key": "k" * 201}, "business_key is longer than 200"),
        ({"correlation_id": "  "}, "correlation_id must be a non-empty string"),
        ({"business_key": "k\x00"}, "business_key contains a NUL character"),
        ({"correlation_id": "c\udfff"}, "correlation_id contains an invalid Unicode"),
    ],
)
def test_bad_keys_are_refused(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        start("chaos", {}, **kwargs)
    assert not TaskInstance.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_starts_with_one_business_key_create_one_task():
    workers = 6
    barrier = threading.Barrier(workers)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def start_one():
        try:
            barrier.wait()
            task, created = start("chaos", {"fail": {"charge": 1}}, business_key="race-1")
            results.append((str(task.pk), created))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=start_one) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({pk for pk, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert TaskInstance.objects.count() == 1
    assert StepRecord.objects.count() == 3
