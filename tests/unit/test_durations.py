from datetime import timedelta

import pytest

from sagas.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("48h", timedelta(hours=48)),
        ("7d", timedelta(days=7)),
        (" 0s ", timedelta(0)),
    ],
)
def test_accepted_forms(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "90", "1.5h", "-1s", "10w", "h", "1 hour"])
def test_bad_durations_name_the_accepted_forms(text):
    with pytest.raises(ValueError, match="90s, 15m, 48h or 7d"):
        parse_duration(text)
