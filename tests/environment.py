"""Loaded with ``-p`` before Django: test environment defaults and a private redis-server.

Settings are read from the environment at import, so defaults must be in place before
pytest-django imports them. The suite never touches a Redis it did not start.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest

os.environ.setdefault("DJANGO_DEBUG", "0")
os.environ.setdefault("DJANGO_SECRET_KEY", "test-" + secrets.token_urlsafe(40))
os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "testserver,127.0.0.1,localhost")
os.environ.setdefault("DJANGO_SECURE_SSL_REDIRECT", "0")
# In-process workers would otherwise start a reconciliation run in every test's first drain.
os.environ.setdefault("SAGAS_RECONCILE_INTERVAL", "0s")
os.environ.setdefault("SAGAS_VAR_DIR", tempfile.mkdtemp(prefix="opsconsole-test-var-"))
# Until the private server is up, point at a port nothing listens on, never the machine's Redis.
os.environ["REDIS_URL"] = "redis://127.0.0.1:1/0"

_redis = None


def pytest_configure(config: pytest.Config) -> None:
    global _redis
    from django.conf import settings

    from sagas.embedded import EmbeddedRedis

    _redis = EmbeddedRedis(Path(os.environ["SAGAS_VAR_DIR"]) / "redis")
    os.environ["REDIS_URL"] = _redis.url
    settings.REDIS_URL = _redis.url
    for queue in settings.RQ_QUEUES.values():
        queue["URL"] = _redis.url
    _allow_audit_rewrite_on_flush()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _redis is not None:
        _redis.stop()


def _allow_audit_rewrite_on_flush() -> None:
    """Django empties tables between transactional tests with TRUNCATE: let it, and only it."""
    from django.db.backends.base.operations import BaseDatabaseOperations

    from sagas.audit import rewrite_allowed

    original = BaseDatabaseOperations.execute_sql_flush

    def execute_sql_flush(self: BaseDatabaseOperations, sql_list: Iterable[str]) -> None:
        with rewrite_allowed(self.connection.alias):
            original(self, sql_list)

    BaseDatabaseOperations.execute_sql_flush = execute_sql_flush  # type: ignore[method-assign]
