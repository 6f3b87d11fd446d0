"""``manage.py reconcile [--saga NAME] [--apply] [--grace 48h] [--json]``.

A dry run unless ``--apply``. Exit 0 on success (also when another run is in progress:
nothing to do), 1 when storage or the database fails, 2 on bad arguments.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sagas import reconciliation
from sagas.durations import parse_duration
from sagas.models import RunTrigger


class Command(BaseCommand):
    help = "Compare S3 and Redis with the database and record findings (a dry run unless --apply)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--saga", default="", help="Only this saga (it needs an s3_prefix).")
        parser.add_argument("--apply", action="store_true", help="Apply each saga's orphan policy.")
        parser.add_argument("--grace", default="", help="Orphan grace for every saga, e.g. 48h.")
        parser.add_argument("--json", action="store_true", help="Print one JSON summary.")

    def handle(self, *args: Any, **options: Any) -> None:
        scope = self._scope(options["saga"], options["grace"])
        progress = None if options["json"] or not self.stderr.isatty() else self._progress
        try:
            run = reconciliation.reconcile(
                scope,
                apply_policies=options["apply"],
                trigger=RunTrigger.COMMAND,
                progress=progress,
            )
        except reconciliation.ReconciliationError as exc:
            raise CommandError(str(exc), returncode=1) from exc
        finally:
            if progress is not None:
                self.stderr.write("", style_func=lambda text: text)
        if run is None:
            self._busy(options["json"])
            return
        summary = reconciliation.summary(run)
        if options["json"]:
            self.stdout.write(json.dumps(summary, sort_keys=True))
        else:
            self.stdout.write(self._text(summary))

    def _scope(self, saga: str, grace: str) -> reconciliation.Scope:
        try:
            duration = parse_duration(grace) if grace else None
            return reconciliation.scope_for(saga or None, duration)
        except ValueError as exc:  # BadRequest too
            raise CommandError(str(exc), returncode=2) from exc

    def _progress(self, saga: str, objects: int) -> None:
        line = f"\r{saga}: {objects} objects listed"
        self.stderr.write(line, style_func=lambda text: text, ending="")
        self.stderr.flush()

    def _busy(self, as_json: bool) -> None:
        running = reconciliation.running_run()
        since = (
            f" (run #{running.pk} since {running.started_at:%Y-%m-%d %H:%M:%S})" if running else ""
        )
        if as_json:
            self.stdout.write(
                json.dumps(
                    {"run": None, "status": "busy", "running": running.pk if running else None}
                )
            )
        else:
            self.stdout.write(f"another reconciliation run is in progress{since}: nothing done")

    def _text(self, summary: dict[str, Any]) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())) or "nothing"
        mode = "applied" if summary["applied"] else "dry run"
        return f"reconciliation run #{summary['run']} {summary['status']} ({mode}): {counts}"
