"""A saga for the findings browser tests, loaded by the test process and its real workers.

Its orphans are old after a second: an operator's delete or archive is checked again, in
the worker, against the saga's ``orphan_grace`` as the worker's code defines it (a test's
monkeypatch never reaches a forked worker), and S3 cannot backdate an object.
"""

from __future__ import annotations

from typing import Any

from sagas.definitions import Saga

PREFIX = "browser-exports/"

exports = Saga("browser-exports", s3_prefix=PREFIX, orphan_grace="1s")


@exports.step
def upload(ctx: Any) -> dict[str, Any]:
    return {"Key": f"{PREFIX}{ctx.task_id}.zip"}
