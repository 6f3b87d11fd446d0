"""The engine keeps the owned-keys index (reconciliation's) in step with step data."""

from __future__ import annotations

from typing import Any

import pytest

from sagas.definitions import RetryPolicy, Saga, registry
from sagas.models import OwnedKey
from sagas.services import start
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db(transaction=True)

owning = Saga("owns-keys", s3_prefix="owns-keys/")


@owning.step
def write(ctx: Any) -> dict[str, Any]:
    return {"Key": f"owns-keys/{ctx.task_id}.zip", "Keys": ["owns-keys/a b.txt", "owns-keys/ü"]}


@write.compensate
def unwrite(ctx: Any) -> None:
    return None


@owning.step(retry=RetryPolicy(max_retries=0, on_exhausted="compensate"))
def then(ctx: Any) -> dict[str, Any]:
    if ctx.input.get("fail"):
        raise RuntimeError("undo the write")
    return {"Keys": "not a list: owns nothing"}


registry.register(owning, origin="tests.engine.test_owned_keys")


def owned_by(task: Any) -> set[tuple[str, str]]:
    return set(OwnedKey.objects.filter(step__task=task).values_list("step__name", "key"))


def test_a_succeeded_step_owns_the_keys_its_data_names():
    task, _ = start("owns-keys", {})
    task = run_to_end(task)
    assert task.status == "completed"
    assert owned_by(task) == {
        ("write", f"owns-keys/{task.pk}.zip"),
        ("write", "owns-keys/a b.txt"),
        ("write", "owns-keys/ü"),
    }
    assert set(OwnedKey.objects.values_list("saga", flat=True)) == {"owns-keys"}


def test_a_compensated_step_owns_nothing():
    task, _ = start("owns-keys", {"fail": True})
    task = run_to_end(task)
    assert task.status == "compensated"
    assert task.steps.get(name="write").status == "compensated"
    assert owned_by(task) == set()
