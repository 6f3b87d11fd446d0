"""``manage.py bench engine|console|reconcile [--json]``: benchmarks (docs/BENCHMARKS.md).

``engine``: what the engine costs per step beyond bare RQ (``sagas.bench_engine``);
``console``: the console's pages on a scratch Postgres database of a million tasks
(``sagas.bench_console``); ``reconcile``: what a dry reconciliation run costs beyond a bare
listing of the same prefix. Exit 0 on success, 1 when what a benchmark needs fails, 2 on
bad arguments (and for ``console`` without Postgres).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sagas import bench, bench_console, bench_engine

PHASES = {
    "put": "putting objects",
    "rows": "writing owned keys",
    "listing": "bare listing",
    "reconcile": "reconciling (timed)",
    "memory": "reconciling (tracemalloc)",
    "cleanup": "deleting objects",
}


class Command(BaseCommand):
    help = (
        "Run a benchmark: engine (the engine's cost per step beyond bare RQ), console (the "
        "console's pages on a scratch database of a million tasks), reconcile (a dry "
        "reconciliation run against a bare listing of the same S3 prefix). "
        "`bench <benchmark> --help` for its options."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        benchmarks = parser.add_subparsers(
            dest="benchmark", metavar="BENCHMARK", title="benchmarks", required=True
        )
        rec = benchmarks.add_parser(
            "reconcile",
            help="Time a dry reconciliation run against a bare listing of the same prefix.",
            description=(
                "Fill a scratch bucket (an embedded S3 server unless AWS_ENDPOINT_URL is set) "
                "with objects, half of them owned by steps; time a bare listing of the prefix "
                "and a dry reconciliation run over it; remove everything it created."
            ),
        )
        rec.add_argument(
            "--objects",
            default=str(bench.DEFAULT_OBJECTS),
            help=f"How many objects to put (default {bench.DEFAULT_OBJECTS}).",
        )
        rec.add_argument("--json", action="store_true", help="Print one JSON object.")
        bench_engine.add_parser(benchmarks)
        bench_console.add_parser(benchmarks)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["benchmark"] == "engine":
            bench_engine.run_command(self, options)
            return
        if options["benchmark"] == "console":
            bench_console.handle(self, options)
            return
        objects = self._objects(options["objects"])
        as_json = options["json"]
        progress = None if as_json or not self.stderr.isatty() else self._progress
        try:
            figures = bench.reconcile_bench(objects, progress)
        except bench.BenchError as exc:
            raise CommandError(str(exc), returncode=1) from exc
        finally:
            if progress is not None:
                self.stderr.write("\r\033[K", style_func=lambda text: text, ending="")
        if as_json:
            self.stdout.write(json.dumps(figures.as_json(), sort_keys=True))
        else:
            self.stdout.write(self._table(figures))

    def _objects(self, value: Any) -> int:
        try:
            objects = int(str(value), 10)
        except ValueError:
            objects = 0
        if objects < 1:
            raise CommandError(
                f"--objects must be a whole number of at least 1, not {value!r}", returncode=2
            )
        return objects

    def _progress(self, phase: str, done: int, total: int) -> None:
        of = f"/{total:,}" if total else ""
        line = f"\r\033[K{PHASES.get(phase, phase)}: {done:,}{of}"
        self.stderr.write(line, style_func=lambda text: text, ending="")
        self.stderr.flush()

    def _table(self, f: bench.ReconcileFigures) -> str:
        where = "embedded moto server" if f.embedded else f"AWS_ENDPOINT_URL {f.endpoint}"
        rows = [
            f"bench reconcile: {f.objects:,} objects ({f.owned:,} owned by {f.steps:,} steps), "
            f"{where}",
            f"{'':<11}{'seconds':>10}{'objects/s':>12}",
            f"{'listing':<11}{f.listing_s:>10.2f}{_rate(f.objects, f.listing_s):>12}",
            f"{'reconcile':<11}{f.reconcile_s:>10.2f}{_rate(f.objects, f.reconcile_s):>12}",
            f"ratio (reconcile / listing): {f.ratio:.3f}",
            f"peak RSS: {f.peak_rss_mib:.1f} MiB; Python peak allocation during a dry run "
            f"(tracemalloc): {f.python_peak_mib:.1f} MiB",
            "findings: " + ", ".join(f"{k} {v:,}" for k, v in f.findings.items()),
        ]
        if not f.redis_checked:
            rows.append("(Redis unavailable: stuck tasks and stale locks were not checked)")
        return "\n".join(rows)


def _rate(objects: int, seconds: float) -> str:
    return f"{objects / seconds:,.0f}" if seconds > 0 else "-"
