"""Parallel groups and dependency levels: the pure join rule and definition-time checks."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from sagas.definitions import Saga, SagaRegistry
from sagas.engine.decisions import effective_timeout
from sagas.engine.joins import FAIL, SUCCEED, WAIT, decide

S, F, C, R, P, W = "succeeded", "failed", "cancelled", "running", "pending", "waiting_retry"


@pytest.mark.parametrize(
    ("mode", "statuses", "just", "expected"),
    [
        ("all", [S, S, S], S, SUCCEED),
        ("all", [S, R, S], S, WAIT),
        ("all", [S, F, R], F, FAIL),
        ("all", [W, F, R], F, FAIL),
        ("all_settled", [S, F, R], F, WAIT),
        ("all_settled", [S, F, C], C, SUCCEED),
        ("all_settled", [F, F, F], F, SUCCEED),
        ("any", [R, S, R], S, SUCCEED),
        ("any", [F, R, W], F, WAIT),
        ("any", [F, F, C], C, FAIL),
        ("race", [R, F, R], F, FAIL),
        ("race", [S, R, R], S, SUCCEED),
    ],
)
def test_join_rule(mode, statuses, just, expected):
    assert decide(mode, statuses, just) == expected


def noop(ctx):
    return None


def test_levels_follow_after_and_declaration_order():
    saga = Saga("dag")
    saga.step(name="a")(noop)
    quotes = saga.parallel("quotes", mode="all_settled", timeout_s=5)
    quotes.branch(name="p1")(noop)
    quotes.branch(name="p2")(noop)
    saga.step(name="b", after=["a"])(noop)
    saga.step(name="c", after=["quotes", "b"])(noop)
    assert saga.levels() == {"a": 0, "quotes": 1, "p1": 1, "p2": 1, "b": 1, "c": 2}
    assert not saga.is_linear


def test_a_cyclic_after_is_rejected_with_the_cycle_named():
    saga = Saga("loop")
    saga.step(name="a", after=["c"])(noop)
    saga.step(name="b", after=["a"])(noop)
    saga.step(name="c", after=["b"])(noop)
    with pytest.raises(ValueError, match=r"after= forms a cycle: a -> c -> b -> a"):
        saga.validate()
    with pytest.raises(ImproperlyConfigured, match="forms a cycle"):
        SagaRegistry().register(saga)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda s: s.step(name="x", after=["nope"])(noop), "unknown step or group 'nope'"),
        (lambda s: s.parallel("g"), "group 'g' has no branches"),
    ],
)
def test_bad_graphs_are_rejected(build, message):
    saga = Saga("bad")
    build(saga)
    with pytest.raises(ValueError, match=message):
        saga.validate()


def test_a_branch_cannot_be_waited_for_directly():
    saga = Saga("branchy")
    group = saga.parallel("g")
    group.branch(name="inner")(noop)
    saga.step(name="after_inner", after=["inner"])(noop)
    with pytest.raises(ValueError, match="wait for their group"):
        saga.validate()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "some"}, "unknown mode 'some'"), ({"timeout_s": 0}, "positive number")],
)
def test_bad_group_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Saga("opts").parallel("g", **kwargs)


def test_group_and_step_names_share_one_namespace():
    saga = Saga("names")
    saga.step(name="quotes")(noop)
    with pytest.raises(ValueError, match="duplicate step name 'quotes'"):
        saga.parallel("quotes")


def test_a_branch_timeout_is_cut_short_by_its_group_deadline():
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    soon = now + timedelta(seconds=2)
    assert effective_timeout(None, None, now) is None
    assert effective_timeout(30, None, now) == 30
    assert effective_timeout(30, soon, now) == 2
    assert effective_timeout(1, soon, now) == 1
