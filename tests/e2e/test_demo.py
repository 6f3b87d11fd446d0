"""The embedded servers and ``manage.py demo`` as a user runs them: real processes, no mocks."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import boto3
import pytest
import redis
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError
from rq import Worker

from sagas.embedded import EmbeddedRedis, EmbeddedS3, ManagedProcess, free_port
from sagas.management.commands.demo import OPERATOR, VIEWER, WORKER_COUNT, ensure_login
from sagas.models import FindingKind

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def process_gone(pid: int) -> bool:
    """Gone or a zombie waiting to be reaped (it holds no resources any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def parent_links() -> dict[int, int]:
    """Each process's parent (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``."""
    parents = parent_links()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_embedded_redis_answers_and_stops(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("save") == {"save": ""}
        assert os.getsid(server.process.pid) == server.process.pid  # Ctrl-C does not reach it
    assert process_gone(server.process.pid)


def test_embedded_s3_serves_the_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedS3("demo-bucket") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.put_object(Bucket="demo-bucket", Key="a.txt", Body=b"hello")
        assert s3.get_object(Bucket="demo-bucket", Key="a.txt")["Body"].read() == b"hello"
    assert process_gone(server.process.pid)


def test_stop_kills_a_process_group_that_ignores_sigterm() -> None:
    script = "trap '' TERM; sleep 60 & wait; sleep 60"
    process = ManagedProcess("stubborn", ["bash", "-c", script]).start()
    time.sleep(0.3)
    group = descendants(process.pid) | {process.pid}
    assert process.stop(timeout=1) == -signal.SIGKILL
    assert wait_until(lambda: all(process_gone(pid) for pid in group))


def test_stop_reaches_descendants_that_left_the_process_group() -> None:
    # What RQ's work horses do: fork, then setpgrp().
    code = "import os, time\nif os.fork() == 0:\n    os.setpgrp()\ntime.sleep(60)"
    process = ManagedProcess("forker", [sys.executable, "-c", code]).start()
    assert wait_until(lambda: len(descendants(process.pid)) == 1)
    (horse,) = descendants(process.pid)
    assert os.getpgid(horse) != process.pid
    process.stop(timeout=1)
    assert wait_until(lambda: process_gone(horse))


def test_children_die_with_their_parent() -> None:
    code = (
        "import time; from sagas.embedded import ManagedProcess;"
        "p = ManagedProcess('sleeper', ['sleep', '60']).start();"
        "print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert wait_until(lambda: process_gone(child_pid))


def workers_of(pid: int) -> list[int]:
    """The RQ workers ``pid`` started (their work horses, one level down, carry the same
    process title)."""
    children = [child for child, parent in parent_links().items() if parent == pid]
    return [child for child in children if cmdline(child).startswith(b"rq:worker:")]


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "DJANGO_DEBUG": "1", "SAGAS_VAR_DIR": str(tmp_path / "var")}
    env.pop("DATABASE_URL", None)  # the demo's own SQLite file, never the test database
    return env


class Demo:
    """``manage.py demo`` running in the background, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        argv = [sys.executable, "manage.py", "demo", "--port", str(self.port)]
        with log.open("w") as out:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self) -> int:
        return self.process.wait(timeout=60)


@pytest.fixture
def demo(demo_env: dict[str, str], tmp_path: Path) -> Iterator[Demo]:
    running = Demo(demo_env, tmp_path / "demo.log")
    try:
        # Migrations, three workers and the web server boot at once: slow on a loaded machine.
        assert wait_until(lambda: "Ctrl-C to stop" in running.output(), 180), running.output()
        yield running
    finally:
        running.process.kill()
        running.process.wait()


def demo_redis(demo: Demo) -> redis.Redis:
    match = re.search(r"redis://127\.0\.0\.1:\d+/0", demo.output())
    assert match, demo.output()
    return redis.Redis.from_url(match.group())


def test_demo_serves_the_console_and_stops_everything_on_sigint(
    demo: Demo, demo_env: dict[str, str]
) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{demo.port}/admin/login/") as response:
        assert response.status == 200
    client = demo_redis(demo)
    assert wait_until(lambda: Worker.count(connection=client) == WORKER_COUNT, 30)
    # Every worker runs a scheduler, but only one holds the queue's scheduler lock.
    assert client.keys("rq:scheduler-lock:*") == [b"rq:scheduler-lock:default"]
    assert wait_until(lambda: len(workers_of(demo.process.pid)) == WORKER_COUNT == 3)
    # One open finding of each kind, found by the seeding's run; the workers, up now, have
    # not started a scheduled run that would already have changed them.
    summary = ", ".join(f"1 {kind}" for kind in FindingKind.values)
    assert summary in demo.output()
    database = Path(demo_env["SAGAS_VAR_DIR"]) / "opsconsole.sqlite3"
    with closing(sqlite3.connect(database)) as db:
        found = db.execute("SELECT kind, state FROM sagas_finding").fetchall()
        runs = db.execute("SELECT trigger, applied FROM sagas_reconciliationrun").fetchall()
    assert sorted(found) == sorted((kind, "open") for kind in FindingKind.values)
    assert runs == [("command", 0)]
    children = descendants(demo.process.pid)
    assert len(children) >= 6  # redis-server, moto, 3 workers, runserver
    demo.process.send_signal(signal.SIGINT)
    assert demo.wait() == 0, demo.output()
    var = Path(demo_env["SAGAS_VAR_DIR"])
    for login in (OPERATOR, VIEWER):
        password = (var / login.password_file).read_text().strip()
        assert f"{login.username} / {password}" in demo.output()
    assert "3 RQ workers with scheduler" in demo.output()
    assert "Stopping 3 workers" in demo.output()
    assert wait_until(lambda: all(process_gone(pid) for pid in children))


def test_demo_stops_everything_when_a_child_dies(demo: Demo) -> None:
    children = descendants(demo.process.pid)
    web = next(pid for pid in children if b"runserver" in cmdline(pid))
    os.kill(web, signal.SIGKILL)
    assert demo.wait() == 1, demo.output()
    assert "web server exited unexpectedly" in demo.output()
    assert wait_until(lambda: all(process_gone(pid) for pid in children))


def test_demo_stops_everything_when_one_of_its_workers_dies(demo: Demo) -> None:
    assert wait_until(lambda: len(workers_of(demo.process.pid)) == WORKER_COUNT, 30)
    children = descendants(demo.process.pid)
    os.kill(workers_of(demo.process.pid)[0], signal.SIGKILL)
    assert demo.wait() == 1, demo.output()
    assert re.search(r"the worker \d exited unexpectedly", demo.output()), demo.output()
    assert wait_until(lambda: all(process_gone(pid) for pid in children))


@pytest.fixture
def console_groups(db: None) -> None:
    """The groups migration 0009 creates (a transactional test elsewhere may have flushed them)."""
    migration = importlib.import_module("sagas.migrations.0009_console_groups")
    for name, codenames in migration.GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = Permission.objects.filter(
            content_type__app_label="sagas", codename__in=codenames
        )
        group.permissions.add(*permissions)


def test_the_demo_logins_are_staff_in_their_group_not_superusers(console_groups: None) -> None:
    ensure_login(OPERATOR, "operator-password")
    ensure_login(VIEWER, "viewer-password")
    users = get_user_model().objects
    operator, viewer = users.get(username="operator"), users.get(username="viewer")
    for user, group in ((operator, "Saga operators"), (viewer, "Saga viewers")):
        assert user.is_staff and user.is_active and not user.is_superuser
        assert list(user.groups.values_list("name", flat=True)) == [group]
    assert operator.check_password("operator-password")
    assert viewer.check_password("viewer-password")
    assert operator.has_perm("sagas.cancel_taskinstance")
    assert viewer.has_perm("sagas.view_taskinstance")
    assert not viewer.has_perm("sagas.cancel_taskinstance")


def test_the_demo_repairs_a_login_on_each_run(console_groups: None) -> None:
    ensure_login(VIEWER, "viewer-password")
    user = get_user_model().objects.get(username="viewer")
    user.is_superuser, user.is_active, user.is_staff = True, False, False
    user.set_password("changed")
    user.save()
    user.groups.set([Group.objects.get(name="Saga operators")])
    user.user_permissions.add(Permission.objects.get(codename="cancel_taskinstance"))
    ensure_login(VIEWER, "viewer-password")
    user = get_user_model().objects.get(username="viewer")
    assert user.is_staff and user.is_active and not user.is_superuser
    assert user.check_password("viewer-password")
    assert list(user.groups.values_list("name", flat=True)) == ["Saga viewers"]
    assert not user.has_perm("sagas.cancel_taskinstance")


def test_a_missing_group_is_a_clear_error(console_groups: None) -> None:
    Group.objects.filter(name="Saga viewers").delete()
    with pytest.raises(CommandError, match="'Saga viewers' is missing"):
        ensure_login(VIEWER, "viewer-password")
