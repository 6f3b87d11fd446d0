"""Saga definitions: the pinned API works, and mistakes fail loudly at import time."""

from __future__ import annotations

import sys
import types

import pytest
from django.core.exceptions import ImproperlyConfigured

from sagas.definitions import (
    CircuitBreakerPolicy,
    RetryPolicy,
    Saga,
    SagaRegistry,
    UnknownSaga,
    registry,
)


def make_saga(name="orders"):
    saga = Saga(name, cancellable=True, s3_prefix="orders/", lock_expiry_s=30)

    @saga.step(
        retry=RetryPolicy(
            max_retries=5, backoff="exponential", base_delay_ms=200, on_exhausted="compensate"
        ),
        breaker=CircuitBreakerPolicy("s3", failure_threshold=5, open_seconds=30),
        timeout_s=300,
    )
    def upload(ctx):
        return {"Key": "k"}

    @upload.compensate(retry=RetryPolicy(max_retries=3, backoff="constant", base_delay_ms=1000))
    def delete_upload(ctx):
        return None

    @saga.step
    def notify(ctx):
        return "sent"

    return saga, upload, notify


def test_pinned_api_builds_an_ordered_saga():
    saga, upload, notify = make_saga()
    assert [s.name for s in saga.steps] == ["upload", "notify"]
    assert [s.index for s in saga.steps] == [0, 1]
    assert upload.retry.max_attempts == 6
    assert upload.breaker == CircuitBreakerPolicy("s3", 5, 30)
    assert upload.timeout_s == 300
    assert upload.compensation is not None
    assert upload.compensation_policy.backoff == "constant"
    assert notify.compensation is None
    assert notify(None) == "sent"


def test_compensation_without_policy_reuses_the_steps():
    saga = Saga("reuse")
    policy = RetryPolicy(max_retries=1)

    @saga.step(retry=policy)
    def act(ctx):
        return None

    @act.compensate
    def undo(ctx):
        return None

    assert act.compensation_policy is policy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"max_retries": 1.5}, "max_retries must be an integer"),
        ({"max_retries": True}, "max_retries must be an integer"),
        ({"backoff": "fibonacci"}, "unknown backoff 'fibonacci'"),
        ({"base_delay_ms": -5}, "base_delay_ms must be an integer >= 0"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
        ({"jitter": "lots"}, "jitter must be a fraction"),
        ({"max_delay_ms": -1}, "max_delay_ms must be an integer >= 0"),
        ({"on_exhausted": "explode"}, "unknown on_exhausted 'explode'"),
    ],
)
def test_bad_retry_policy(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "name must match"),
        ({"name": "has space"}, "name must match"),
        ({"name": "s3", "failure_threshold": 0}, "failure_threshold must be an integer >= 1"),
        ({"name": "s3", "open_seconds": 0}, "open_seconds must be an integer >= 1"),
    ],
)
def test_bad_breaker_policy(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CircuitBreakerPolicy(**kwargs)


def test_duplicate_step_name_is_refused():
    saga = Saga("dupes")

    @saga.step
    def pay(ctx):
        return None

    with pytest.raises(ValueError, match="duplicate step name 'pay'"):

        @saga.step(name="pay")
        def pay_again(ctx):
            return None


@pytest.mark.parametrize("name", ["", "Upper", "has space", "a/b", "x" * 101])
def test_bad_saga_name(name):
    with pytest.raises(ValueError, match="invalid saga name"):
        Saga(name)


def test_bad_step_name():
    saga = Saga("names")
    with pytest.raises(ValueError, match="invalid step name 'a b'"):
        saga.step(name="a b")(lambda ctx: None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retry": {"max_retries": 1}}, "retry must be a RetryPolicy"),
        ({"breaker": "s3"}, "breaker must be a CircuitBreakerPolicy"),
        ({"timeout_s": 0}, "timeout_s must be a positive number"),
        ({"timeout_s": -1}, "timeout_s must be a positive number"),
    ],
)
def test_bad_step_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Saga("opts").step(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lock_expiry_s": 0}, "lock_expiry_s must be an integer >= 1"),
        ({"deadline_s": -3}, "deadline_s must be an integer >= 1"),
        ({"validate_input": "not callable"}, "validate_input must be callable"),
    ],
)
def test_bad_saga_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Saga("opts", **kwargs)


def test_on_exhausted_is_rejected_on_a_compensation_policy():
    _, upload, _ = make_saga("comp")
    saga2 = Saga("comp2")

    @saga2.step
    def act(ctx):
        return None

    with pytest.raises(ValueError, match="on_exhausted is not allowed on a compensation"):
        act.compensate(retry=RetryPolicy(on_exhausted="fail"))
    with pytest.raises(ValueError, match="already has a compensation"):
        upload.compensate(lambda ctx: None)


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def test_registry_loads_modules_and_refuses_duplicate_saga_names(monkeypatch):
    first, _, _ = make_saga("billing")
    second, _, _ = make_saga("billing")
    monkeypatch.setitem(sys.modules, "fake_sagas_a", _module("fake_sagas_a", billing=first))
    monkeypatch.setitem(sys.modules, "fake_sagas_b", _module("fake_sagas_b", billing=second))
    monkeypatch.setitem(sys.modules, "fake_sagas_c", _module("fake_sagas_c", again=first))
    reg = SagaRegistry()
    reg.load(["fake_sagas_a", "fake_sagas_c"])  # the same object seen twice is fine
    assert reg.names() == ["billing"]
    assert reg.get("billing") is first
    with pytest.raises(ImproperlyConfigured, match=r"two sagas are named 'billing'.*fake_sagas_a"):
        reg.load(["fake_sagas_b"])


def test_registry_refuses_unimportable_modules_and_empty_sagas(monkeypatch):
    reg = SagaRegistry()
    with pytest.raises(ImproperlyConfigured, match=r"cannot import 'no\.such\.module'"):
        reg.load(["no.such.module"])
    monkeypatch.setitem(sys.modules, "fake_empty", _module("fake_empty", s=Saga("empty")))
    with pytest.raises(ImproperlyConfigured, match="saga 'empty' in fake_empty defines no steps"):
        reg.load(["fake_empty"])


def test_unknown_saga_is_a_clear_lookup_error():
    with pytest.raises(UnknownSaga, match="unknown saga 'nope'"):
        SagaRegistry().get("nope")


def test_example_sagas_are_registered_at_app_ready():
    assert {"create-zip", "chaos"} <= set(registry.names())
    chaos = registry.get("chaos")
    assert [s.name for s in chaos.steps] == ["reserve", "charge", "ship"]
    assert all(s.compensation is not None for s in chaos.steps)
    assert chaos.cancellable and chaos.lock_expiry_s == 10
    create_zip = registry.get("create-zip")
    assert create_zip.s3_prefix == "create-zip/" and create_zip.cancellable


def test_chaos_input_can_override_on_exhausted():
    chaos = registry.get("chaos")
    charge = chaos.get_step("charge")
    assert charge is not None
    assert chaos.action_policy(charge, {}).exhausted_action == "compensate"
    policy = chaos.action_policy(charge, {"on_exhausted": "dead_letter"})
    assert policy.exhausted_action == "dead_letter"
    assert policy.max_retries == charge.retry.max_retries
