"""Pure parts of reconciliation: owned keys in step data, finding states, saga options."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sagas.definitions import Saga
from sagas.findings import can_change
from sagas.ownership import keys_in
from sagas.reconciliation import HeldLock, stale_reason


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"Key": "a/b.zip"}, ["a/b.zip"]),
        ({"Keys": ["x", "y", "x"]}, ["x", "y"]),
        ({"Key": "k", "Keys": ["k", "l"]}, ["k", "l"]),
        ({"Key": ""}, []),
        ({"Key": 3, "Keys": "not-a-list"}, []),
        ({"Keys": ["ok", None, 5, "x" * 1025]}, ["ok"]),
        (None, []),
        (["Key"], []),
    ],
)
def test_keys_in_step_data(data, expected):
    assert keys_in(data) == expected


@pytest.mark.parametrize(
    ("state", "to", "allowed"),
    [
        ("open", "deleted", True),
        ("open", "ignored", True),
        ("ignored", "deleted", False),  # an ignored orphan is never deleted
        ("ignored", "resolved", True),
        ("deleted", "open", True),  # it came back
        ("deleted", "archived", False),
        ("resolved", "resolved", False),
    ],
)
def test_finding_state_changes(state, to, allowed):
    assert can_change(state, to) is allowed


@pytest.mark.parametrize(
    ("token", "expires", "reason"),
    [
        ("dead", True, "its attempt is no longer running or stopped beating"),
        ("dead", False, "its attempt is no longer running or stopped beating"),
        ("unknown", True, None),  # brand new (its attempt to come), or it goes by itself
        ("unknown", False, "no expiry and no attempt holds its token"),
    ],
)
def test_stale_reason_of_a_lock_no_live_attempt_holds(token, expires, reason):
    assert stale_reason(HeldLock("sagas:lock:t", token, expires), {"dead"}) == reason


def test_saga_reconciliation_options():
    saga = Saga("opts", s3_prefix="opts/", orphan_policy="archive", orphan_grace="7d")
    assert saga.orphan_grace == timedelta(days=7)
    assert Saga("defaults").orphan_policy == "report"
    assert Saga("defaults").orphan_grace == timedelta(hours=48)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"s3_prefix": "no-slash"}, "must end with '/'"),
        ({"orphan_policy": "shred"}, "unknown orphan_policy"),
        ({"orphan_grace": "soon"}, "invalid duration"),
        ({"orphan_grace": timedelta(hours=-1)}, "orphan_grace"),
    ],
)
def test_bad_saga_reconciliation_options(options, message):
    with pytest.raises(ValueError, match=message):
        Saga("bad", **options)
