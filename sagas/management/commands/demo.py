"""``manage.py demo``: the whole product on one machine, with nothing to install but Python.

Starts an embedded Redis and S3, three RQ workers and the web console, creates an operator
and a viewer login, demo tasks and one reconciliation finding of each kind
(``sagas.demo_data``), prints where everything is, and stops it all (in reverse order) on
Ctrl-C.
The demo process itself never talks to Redis or S3 through Django (its settings were read
before the embedded servers existed): everything that does runs in a child process whose
environment points at them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    OutputWrapper,
)
from django.db import connections

from sagas import demo_data, services
from sagas.embedded import (
    STOP_TIMEOUT_S,
    EmbeddedRedis,
    EmbeddedS3,
    EmbeddedServiceError,
    ManagedProcess,
    free_port,
    http_answers,
    port_is_free,
    wait_until_ready,
)
from sagas.models import FindingKind, TaskInstance
from sagas.reconciliation import ReconciliationError
from sagas.storage import StorageError


@dataclass(frozen=True)
class DemoLogin:
    """A console login the demo creates: a staff user in one of the console's groups."""

    username: str
    group: str
    password_file: str
    can: str


OPERATOR = DemoLogin("operator", "Saga operators", "demo-password.txt", "sees and acts")
VIEWER = DemoLogin("viewer", "Saga viewers", "demo-viewer-password.txt", "sees only")
LOGINS = (OPERATOR, VIEWER)
# Several workers, so parallel branches really run side by side. Each runs a scheduler;
# only the one holding RQ's scheduler lock moves scheduled jobs, the others stand by.
WORKER_COUNT = 3
WORKER_ARGUMENTS = ["rqworker", "--with-scheduler", "default"]
WEB_STARTUP_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5
SLOW_SHIP_MS = 60_000  # the README promises a minute to find the task and cancel it

# (saga, input, business key): once the engine runs them they end in every status.
DEMO_TASKS: list[tuple[str, dict[str, Any], str]] = [
    # First, so their provider branches get the workers before the slow tasks at the end.
    ("flight-search", {}, "demo-flight-search-partial-results"),
    ("flight-search", {"notify": "fail"}, "demo-flight-search-notify-fails"),
    ("chaos", {}, "demo-completes"),
    ("chaos", {"fail": {"charge": 2}}, "demo-retries-then-completes"),
    ("chaos", {"fail": {"charge": -1}}, "demo-compensated"),
    ("chaos", {"fail": {"charge": -1}, "on_exhausted": "fail"}, "demo-failed"),
    ("chaos", {"fail": {"charge": -1}, "on_exhausted": "dead_letter"}, "demo-dead-lettered"),
    (
        "chaos",
        {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}},
        "demo-compensation-failed",
    ),
    ("create-zip", {"files": {"hello.txt": "hello"}}, "demo-zip"),
    # Last: each keeps a worker busy for a minute. Cancelled, the first stops at once; the
    # second stays visibly cancelling while its refund and release work for 5 s each.
    ("chaos", {"sleep_ms": {"ship": SLOW_SHIP_MS}}, "demo-slow-ship-cancel-me"),
    (
        "chaos",
        {
            "sleep_ms": {"ship": SLOW_SHIP_MS},
            "compensation_sleep_ms": {"charge": 5000, "reserve": 5000},
        },
        "demo-slow-undo-cancel-me",
    ),
]


class StopDemo(Exception):
    """Raised by the SIGINT/SIGTERM handler to unwind into the cleanup."""


def _request_stop(signum: int, frame: FrameType | None) -> None:
    _shield_from_signals()
    raise StopDemo(signal.Signals(signum).name)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("Already stopping; please wait.\n")


def _shield_from_signals() -> None:
    """Let the cleanup finish: a second Ctrl-C must not abandon half-stopped children."""
    signal.signal(signal.SIGINT, _already_stopping)
    signal.signal(signal.SIGTERM, _already_stopping)


def _install_stop_handlers() -> None:
    # Installed explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


def demo_password(path: Path) -> str:
    """A login's password: generated on the first run, then read from ``path`` (0600)."""
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return path.read_text().strip()
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(password + "\n")
    return password


def ensure_login(login: DemoLogin, password: str) -> None:
    """Create or repair ``login``: active staff, not a superuser, in its group alone, and
    ``password`` logs in."""
    try:
        group = Group.objects.get(name=login.group)
    except Group.DoesNotExist:
        raise CommandError(
            f"the group {login.group!r} is missing (migration sagas 0009 creates it)"
        ) from None
    user, _ = get_user_model().objects.get_or_create(username=login.username)
    user.is_staff = user.is_active = True
    user.is_superuser = False
    if not user.check_password(password):
        user.set_password(password)
    user.save()
    user.groups.set([group])
    user.user_permissions.clear()  # what it may do comes from its group only


def seed_demo_tasks() -> int:
    """Start the demo tasks unless there are tasks already; return how many were created."""
    if TaskInstance.objects.exists():
        return 0
    created = 0
    for saga, task_input, business_key in DEMO_TASKS:
        created += services.start(saga, task_input, business_key=business_key)[1]
    return created


def seed_demo_findings() -> str:
    """Set up one reconciliation finding of each kind and record the run that finds them
    (``sagas.demo_data``), unless there are findings already; what happened, in one line."""
    try:
        seeded = demo_data.seed_demo_findings()
    except (demo_data.DemoSeedingError, ReconciliationError, StorageError) as exc:
        raise CommandError(f"could not set up the demo's findings: {exc}") from exc
    if seeded is None:
        return "Reconciliation findings exist already."
    counts = seeded.run.counts
    kinds = ", ".join(f"{counts.get(kind, 0)} {kind}" for kind in FindingKind.values)
    return (
        f"Recorded reconciliation run #{seeded.run.pk} (a dry run, orphan grace "
        f"{seeded.grace.total_seconds():.0f}s): {kinds}."
    )


def database_description() -> str:
    """Where the database is, without its password."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"SQLite file {db['NAME']}"
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    return f"{engine} {db.get('USER', '')}@{db.get('HOST', '')}:{db.get('PORT', '')}/{db['NAME']}"


def choose_port(requested: int, out: OutputWrapper) -> int:
    """``requested`` if it is free, else a free port (and say so)."""
    if port_is_free(requested):
        return requested
    port = free_port()
    out.write(f"Port {requested} is taken; the console uses port {port} instead.\n")
    return port


class EmbeddedDemo:
    """Starts the demo's processes, watches them, and stops them in reverse order."""

    def __init__(self, command: BaseCommand, port: int, with_worker: bool) -> None:
        self.out = command.stdout
        self.style = command.style
        self.port = port
        self.with_worker = with_worker
        self.var_dir = Path(settings.VAR_DIR)
        self.watched: list[ManagedProcess] = []

    def run(self) -> str | None:
        """Run until Ctrl-C (returns None) or a child dies (returns what happened)."""
        _install_stop_handlers()
        stack = ExitStack()
        try:
            self._start(stack)
            failure = self._watch()
            self.out.write(self.style.ERROR(f"\nUnexpected exit: {failure}; stopping the demo."))
            return failure
        except StopDemo as stop:
            self.out.write(f"\n{stop} received: stopping the demo.\n")
            return None
        except EmbeddedServiceError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            _shield_from_signals()
            stack.close()
            self.out.write("Everything the demo started has stopped.\n")

    def _start(self, stack: ExitStack) -> None:
        passwords = self._prepare_database()
        env = self._start_backends(stack)
        self._run_manage("demo", "--seed-only", env=env)
        if self.with_worker:
            self._start_workers(stack, env)
        self._start_web(stack, env)
        self._print_banner(passwords, env)

    def _prepare_database(self) -> dict[DemoLogin, str]:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=1)
        passwords = {login: demo_password(self._password_file(login)) for login in LOGINS}
        for login, password in passwords.items():
            ensure_login(login, password)
        connections.close_all()  # the children share the SQLite file
        return passwords

    def _password_file(self, login: DemoLogin) -> Path:
        return self.var_dir / login.password_file

    def _start_backends(self, stack: ExitStack) -> dict[str, str]:
        self.out.write("Starting the embedded Redis and S3 servers...\n")
        log_dir = self.var_dir / "log"
        redis = EmbeddedRedis(self.var_dir / "redis", log_path=log_dir / "redis.log")
        stack.callback(self._stop, "Redis", redis.process)
        s3 = EmbeddedS3(settings.SAGAS_S3_BUCKET, log_path=log_dir / "s3.log")
        stack.callback(self._stop, "S3", s3.process)
        self.watched += [redis.process, s3.process]
        return self._child_env(redis, s3)

    def _child_env(self, redis: EmbeddedRedis, s3: EmbeddedS3) -> dict[str, str]:
        env = {**os.environ, **s3.env(), "REDIS_URL": redis.url, "DJANGO_DEBUG": "1"}
        env["PYTHONUNBUFFERED"] = "1"  # worker and server logs appear as they happen
        return env

    def _start_web(self, stack: ExitStack, env: dict[str, str]) -> None:
        self.port = choose_port(self.port, self.out)
        address = f"127.0.0.1:{self.port}"
        web = self._start_child(stack, "web server", ["runserver", address, "--noreload"], env)
        login_url = f"http://{address}/admin/login/"
        wait_until_ready(web, lambda: http_answers(login_url), WEB_STARTUP_TIMEOUT_S)

    def _start_workers(self, stack: ExitStack, env: dict[str, str]) -> None:
        workers: list[ManagedProcess] = []
        stack.callback(self._stop_workers, workers)  # those started so far, if one fails
        for number in range(1, WORKER_COUNT + 1):
            workers.append(self._spawn(f"worker {number}", WORKER_ARGUMENTS, env))

    def _start_child(
        self, stack: ExitStack, name: str, arguments: list[str], env: dict[str, str]
    ) -> ManagedProcess:
        process = self._spawn(name, arguments, env)
        stack.callback(self._stop, name, process)
        return process

    def _spawn(self, name: str, arguments: list[str], env: dict[str, str]) -> ManagedProcess:
        argv = self._manage_argv(*arguments)
        process = ManagedProcess(name, argv, env=env, cwd=Path(settings.BASE_DIR))
        self.watched.append(process.start())
        return process

    def _stop(self, name: str, process: ManagedProcess) -> None:
        self.out.write(f"Stopping {name}...\n")
        process.stop()

    def _stop_workers(self, workers: list[ManagedProcess]) -> None:
        """Stop the workers together: each shuts down warm (it finishes its running step,
        if it can within the stop timeout), and one slow step must not delay the others."""
        if not workers:
            return
        self.out.write(
            f"Stopping {len(workers)} workers (up to {STOP_TIMEOUT_S:.0f} s for running steps)...\n"
        )
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            list(pool.map(ManagedProcess.stop, workers))

    def _run_manage(self, *arguments: str, env: dict[str, str]) -> None:
        argv = self._manage_argv(*arguments)
        try:
            subprocess.run(argv, env=env, cwd=settings.BASE_DIR, check=True)
        except subprocess.CalledProcessError as exc:
            raise CommandError(f"manage.py {' '.join(arguments)} failed (see above)") from exc

    def _manage_argv(self, *arguments: str) -> list[str]:
        return [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), *arguments]

    def _watch(self) -> str:
        while True:
            for process in self.watched:
                if process.exit_code is not None:
                    return f"the {process.name} exited unexpectedly (code {process.exit_code})"
            time.sleep(WATCH_INTERVAL_S)

    def _print_banner(self, passwords: dict[DemoLogin, str], env: dict[str, str]) -> None:
        workers = f"{WORKER_COUNT} RQ workers with scheduler, queue default"
        rows = [
            ("Console", f"http://127.0.0.1:{self.port}/admin/"),
            *[
                (
                    "Login",
                    f"{login.username} / {password}  ({login.group}: {login.can}; "
                    f"saved in {self._password_file(login)})",
                )
                for login, password in passwords.items()
            ],
            ("Database", database_description()),
            ("Redis", f"{env['REDIS_URL']}  (embedded, in memory)"),
            ("S3", f"{env['AWS_ENDPOINT_URL']}  bucket {env['SAGAS_S3_BUCKET']}  (embedded moto)"),
            ("Workers", workers if self.with_worker else "none (--no-worker)"),
            ("Logs", f"Redis and S3 in {self.var_dir / 'log'}; worker and web server below"),
        ]
        lines = [f"  {label:<9} {value}" for label, value in rows]
        self.out.write(self.style.SUCCESS("\nThe saga operations console is running.\n"))
        self.out.write("\n".join(lines) + "\n\n" + self.style.WARNING("Ctrl-C to stop.") + "\n")


class Command(BaseCommand):
    help = "Run the embedded demo: Redis, S3, three workers and the console on 127.0.0.1."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8000, help="console port (default 8000)")
        parser.add_argument("--no-worker", action="store_true", help="do not start the workers")
        # Internal: the demo seeds its tasks from a child that sees the embedded servers.
        parser.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)

    def handle(
        self, *args: Any, port: int, no_worker: bool, seed_only: bool, **options: Any
    ) -> None:
        if seed_only:
            created = seed_demo_tasks()
            self.stdout.write(
                f"Created {created} demo tasks." if created else "Demo tasks exist already."
            )
            self.stdout.write(seed_demo_findings())
            return
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, got {port}", returncode=2)
        failure = EmbeddedDemo(self, port, with_worker=not no_worker).run()
        if failure:
            raise CommandError(f"The demo stopped because {failure}.")
