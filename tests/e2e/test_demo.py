"""The embedded servers and ``manage.py demo`` as a user runs them: real processes, no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import redis

from sagas.embedded import EmbeddedRedis, EmbeddedS3, ManagedProcess, free_port

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


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from the parent links in /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
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
        assert wait_until(lambda: "Ctrl-C to stop" in running.output(), 90), running.output()
        yield running
    finally:
        running.process.kill()
        running.process.wait()


def test_demo_serves_the_console_and_stops_everything_on_sigint(
    demo: Demo, demo_env: dict[str, str]
) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{demo.port}/admin/login/") as response:
        assert response.status == 200
    children = descendants(demo.process.pid)
    assert len(children) >= 4  # redis-server, moto, worker, runserver
    demo.process.send_signal(signal.SIGINT)
    assert demo.wait() == 0, demo.output()
    password = (Path(demo_env["SAGAS_VAR_DIR"]) / "demo-password.txt").read_text().strip()
    assert f"operator / {password}" in demo.output()
    assert wait_until(lambda: all(process_gone(pid) for pid in children))


def test_demo_stops_everything_when_a_child_dies(demo: Demo) -> None:
    children = descendants(demo.process.pid)
    web = next(pid for pid in children if b"runserver" in cmdline(pid))
    os.kill(web, signal.SIGKILL)
    assert demo.wait() == 1, demo.output()
    assert "web server exited unexpectedly" in demo.output()
    assert wait_until(lambda: all(process_gone(pid) for pid in children))
