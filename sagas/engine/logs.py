"""Structured engine logs: every line carries task, step, attempt, correlation and trace ids.

``traceparent`` uses the W3C trace-context format (``00-<trace id>-<span id>-01``) so an
OpenTelemetry collector can stitch engine lines into the task's trace.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import MutableMapping
from typing import Any

CONTEXT_FIELDS = (
    "task_id",
    "saga",
    "step",
    "kind",
    "attempt",
    "correlation_id",
    "trace_id",
    "traceparent",
)


def traceparent(trace_id: str, span_id: str | None = None) -> str:
    return f"00-{trace_id}-{span_id or secrets.token_hex(8)}-01"


class EngineLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the task's context to every record (as ``extra`` fields)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def engine_logger(task: Any, **fields: Any) -> EngineLogger:
    """A logger bound to a task (a ``TaskInstance`` or just its id) and step fields."""
    context: dict[str, Any] = {"task_id": str(getattr(task, "pk", task))}
    if hasattr(task, "trace_id"):
        context.update(
            saga=task.saga,
            correlation_id=task.correlation_id,
            trace_id=task.trace_id,
            traceparent=traceparent(task.trace_id),
        )
    context.update(fields)
    return EngineLogger(logging.getLogger("sagas.engine"), context)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the engine's context fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
