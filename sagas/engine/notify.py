"""Telling humans that a task needs them: signal, mail to ADMINS, optional webhook."""

from __future__ import annotations

import json
import logging
import urllib.request
from uuid import UUID

from django.conf import settings
from django.core.mail import mail_admins

from sagas import signals
from sagas.models import AuditEntry, StepRecord, TaskInstance
from sagas.states import StepStatus, TaskStatus

logger = logging.getLogger("sagas.engine")


def compensation_failed(task_id: UUID) -> None:
    """Runs after the commit that moved the task to ``compensation_failed``; tells humans
    once per task (a failed retry_compensation is visible in the console and audit)."""
    task = TaskInstance.objects.get(pk=task_id)
    entries = AuditEntry.objects.filter(task=task, to_status=TaskStatus.COMPENSATION_FAILED)
    if entries.count() > 1:
        return
    failed = list(StepRecord.objects.filter(task=task, status=StepStatus.COMPENSATION_FAILED))
    for receiver, result in signals.compensation_failed.send_robust(
        sender=TaskInstance, task=task, failed_steps=failed
    ):
        if isinstance(result, Exception):
            logger.error("compensation_failed receiver %r raised %r", receiver, result)
    summary = "; ".join(f"{s.name}: {s.compensation_error}" for s in failed)
    try:
        mail_admins(
            f"Task {task.pk} ({task.saga}) needs an operator: compensation failed",
            f"Compensation failed for good and the task is parked.\n\n{summary}\n\n"
            f"Trace id: {task.trace_id}\nCorrelation id: {task.correlation_id}\n",
        )
    except Exception:  # a mail outage must not hide the task; it is in the console
        logger.exception("could not mail admins about task %s", task.pk)
    _post_webhook(task, failed)


def _post_webhook(task: TaskInstance, failed: list[StepRecord]) -> None:
    url = settings.SAGAS_COMPENSATION_FAILED_WEBHOOK
    if not url:
        return
    body = json.dumps(
        {
            "event": "compensation_failed",
            "task_id": str(task.pk),
            "saga": task.saga,
            "trace_id": task.trace_id,
            "correlation_id": task.correlation_id,
            "steps": [{"name": s.name, "error": s.compensation_error} for s in failed],
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - operator-configured URL
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        urllib.request.urlopen(request, timeout=5).close()  # noqa: S310 - operator-configured
    except OSError:
        logger.exception("compensation_failed webhook to %s failed for task %s", url, task.pk)
