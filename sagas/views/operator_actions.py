"""An operator's action on one task, and the admin message that says what it did.

The same wording serves the task page's buttons and the bulk actions' summaries."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import QueryDict

from sagas import services
from sagas.models import TaskInstance

CANCEL_MESSAGES = {
    "cancelled": (messages.SUCCESS, "Cancel requested: the task is now {status}."),
    "already_cancelled": (messages.WARNING, "Nothing changed: the task is already {status}."),
    "already_completed": (messages.WARNING, "Nothing changed: the task already completed."),
    "already_finished": (
        messages.WARNING,
        "Nothing changed: the task is already {status}, too late to cancel.",
    ),
    "not_cancellable": (messages.ERROR, "Nothing changed: this saga is not cancellable."),
    "not_found": (messages.ERROR, "Nothing changed: the task no longer exists."),
}
DONE = {
    "resolve": "Resolved: the task is now {status}.",
    "retry-compensation": "Compensation retried: the task is now {status}.",
    "redrive": "Redriven: the task is now {status}.",
}
STOPPING = (
    " Its running step {steps} has been asked to stop; the task stays cancelling until it "
    "has stopped and the undos have run."
)


def perform(slug: str, task: TaskInstance, user: Any, form: QueryDict) -> tuple[int, str]:
    """Run the action named ``slug`` on ``task`` for ``user``: (message level, message)."""
    note = form.get("note", "")
    if slug == "cancel":
        return _cancel(task, user, note)
    operation = {
        "resolve": services.resolve,
        "retry-compensation": services.retry_compensation,
        "redrive": services.redrive,
    }[slug]
    try:
        after = operation(task.pk, user, note)
    except services.InvalidInput:
        return messages.ERROR, "Nothing changed: a note is required (say what you did and why)."
    except services.ActionNotAllowed as refused:
        return messages.WARNING, f"Nothing changed: {refused}."
    except services.TaskNotFound:
        return messages.ERROR, "Nothing changed: the task no longer exists."
    return messages.SUCCESS, DONE[slug].format(status=after.status)


def _cancel(task: TaskInstance, user: Any, note: str) -> tuple[int, str]:
    outcome = services.cancel(task.pk, actor=user, reason=note.strip())
    level, text = CANCEL_MESSAGES[outcome.outcome]
    message = text.format(status=outcome.status)
    if outcome.outcome == "cancelled" and outcome.status == "cancelling":
        running = services.running_steps(task.pk)
        if running:
            message += STOPPING.format(steps=", ".join(running))
    return level, message
