"""``manage.py demo``: the whole product on one machine, with nothing to install but Python.

Starts an embedded Redis and S3, one RQ worker and the web console, creates a demo operator
and demo tasks, prints where everything is, and stops it all (in reverse order) on Ctrl-C.
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
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    OutputWrapper,
)
from django.db import connections

from sagas import services
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
from sagas.models import TaskInstance

OPERATOR_USERNAME = "operator"
WORKER = "worker"
WEB_STARTUP_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5

# (saga, input, business key): once the engine runs them they end in every status.
DEMO_TASKS: list[tuple[str, dict[str, Any], str]] = [
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
    ("flight-search", {}, "demo-flight-search-partial-results"),
    ("flight-search", {"notify": "fail"}, "demo-flight-search-notify-fails"),
    # Last: with one worker, its minute-long step holds up what is queued behind it.
    ("chaos", {"sleep_ms": {"ship": 20000}}, "demo-slow-ship-cancel-me"),
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
    """The operator's password: generated on the first run, then read from ``path`` (0600)."""
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return path.read_text().strip()
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(password + "\n")
    return password


def ensure_operator(password: str) -> None:
    """Create or repair the demo superuser so that ``password`` logs in."""
    user, _ = get_user_model().objects.get_or_create(username=OPERATOR_USERNAME)
    user.is_staff = user.is_superuser = user.is_active = True
    if not user.check_password(password):
        user.set_password(password)
    user.save()


def seed_demo_tasks() -> int:
    """Start the demo tasks unless there are tasks already; return how many were created."""
    if TaskInstance.objects.exists():
        return 0
    created = 0
    for saga, task_input, business_key in DEMO_TASKS:
        created += services.start(saga, task_input, business_key=business_key)[1]
    return created


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
        self.password_file = self.var_dir / "demo-password.txt"
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
        password = self._prepare_database()
        env = self._start_backends(stack)
        self._run_manage("demo", "--seed-only", env=env)
        if self.with_worker:
            self._start_child(stack, WORKER, ["rqworker", "--with-scheduler", "default"], env)
        self._start_web(stack, env)
        self._print_banner(password, env)

    def _prepare_database(self) -> str:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=1)
        password = demo_password(self.password_file)
        ensure_operator(password)
        connections.close_all()  # the children share the SQLite file
        return password

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

    def _start_child(
        self, stack: ExitStack, name: str, arguments: list[str], env: dict[str, str]
    ) -> ManagedProcess:
        argv = self._manage_argv(*arguments)
        process = ManagedProcess(name, argv, env=env, cwd=Path(settings.BASE_DIR))
        stack.callback(self._stop, name, process)
        self.watched.append(process.start())
        return process

    def _stop(self, name: str, process: ManagedProcess) -> None:
        # A worker shuts down warm: it finishes the running step first, if it can in time.
        hint = f" (up to {STOP_TIMEOUT_S:.0f} s for its running step)" if name == WORKER else ""
        self.out.write(f"Stopping {name}{hint}...\n")
        process.stop()

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

    def _print_banner(self, password: str, env: dict[str, str]) -> None:
        worker = "1 RQ worker with scheduler, queue default" if self.with_worker else "none"
        rows = [
            ("Console", f"http://127.0.0.1:{self.port}/admin/"),
            ("Login", f"{OPERATOR_USERNAME} / {password}  (saved in {self.password_file})"),
            ("Database", database_description()),
            ("Redis", f"{env['REDIS_URL']}  (embedded, in memory)"),
            ("S3", f"{env['AWS_ENDPOINT_URL']}  bucket {env['SAGAS_S3_BUCKET']}  (embedded moto)"),
            ("Worker", worker),
            ("Logs", f"Redis and S3 in {self.var_dir / 'log'}; worker and web server below"),
        ]
        lines = [f"  {label:<9} {value}" for label, value in rows]
        self.out.write(self.style.SUCCESS("\nThe saga operations console is running.\n"))
        self.out.write("\n".join(lines) + "\n\n" + self.style.WARNING("Ctrl-C to stop.") + "\n")


class Command(BaseCommand):
    help = "Run the embedded demo: Redis, S3, a worker and the console on 127.0.0.1."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8000, help="console port (default 8000)")
        parser.add_argument("--no-worker", action="store_true", help="do not start a worker")
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
            return
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, got {port}", returncode=2)
        failure = EmbeddedDemo(self, port, with_worker=not no_worker).run()
        if failure:
            raise CommandError(f"The demo stopped because {failure}.")
