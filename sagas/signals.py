"""Signals other code can listen to."""

from django.dispatch import Signal

# Sent once each time a task enters compensation_failed, after the change committed.
# Arguments: task (TaskInstance), failed_steps (list of StepRecord).
compensation_failed = Signal()
