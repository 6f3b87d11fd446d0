"""A loopback TCP proxy that lets tests simulate Redis and Postgres outages without root.

Worker processes are pointed at the proxy's port instead of the real server. ``cut()`` then
behaves like the server crashing (open connections die, new connects are refused) and
``restore()`` like it coming back on the same address, while the real server keeps running.

One daemon thread runs a ``selectors`` event loop for every connection; the test thread talks
to it through a command queue and a socketpair that wakes the loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CHUNK = 64 * 1024
# Stop reading a side while this much waits to be written to the other: back-pressure, so a
# slow reader cannot make the proxy buffer without bound.
HIGH_WATER = 1024 * 1024
# The loop sleeps in select() until a socket or a command wakes it; the timeout is only a
# safety net, never a poll interval anything depends on.
SELECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 10.0
REBIND_TIMEOUT_S = 5.0
BACKLOG = 128

_WAKE = "wake"
_LISTEN = "listen"


class ProxyError(RuntimeError):
    """The proxy could not do what was asked (not started, stopped, port taken, stuck loop)."""


class _Side:
    """One socket of a forwarded pair, with the bytes waiting to be written to it."""

    __slots__ = ("events", "outbox", "pair", "sock")

    def __init__(self, sock: socket.socket, pair: _Pair) -> None:
        self.sock = sock
        self.pair = pair
        self.outbox = bytearray()
        self.events = 0  # what the selector watches now; 0 means not registered


class _Pair:
    """A client connection and the upstream connection the proxy opened for it."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = _Side(client, self)
        self.upstream = _Side(upstream, self)
        self.connecting = True  # the non-blocking upstream connect has not finished yet
        self.draining = False  # a side sent EOF: deliver what it sent, then close both
        self.closed = False

    def peer(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def wanted(self, side: _Side) -> int:
        """The selector events ``side`` needs now."""
        if self.connecting and side is self.upstream:
            return selectors.EVENT_WRITE  # writable means the connect finished, or failed
        events = selectors.EVENT_WRITE if side.outbox else 0
        if not self.draining and len(self.peer(side).outbox) < HIGH_WATER:
            events |= selectors.EVENT_READ
        return events


class _Command:
    """An action for the loop thread, and how its caller learns it is done."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.done = threading.Event()
        self.error: BaseException | None = None


class LoopbackProxy:
    """Forwards 127.0.0.1:<port> to (target_host, target_port); the test cuts and restores it."""

    _selector: selectors.BaseSelector  # made by start(), so an unstarted proxy holds no fd

    def __init__(self, target_host: str, target_port: int, name: str = "proxy") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.name = name
        self.accepted = 0  # total connections accepted since start (written by the loop only)
        self._port = 0
        self._target: tuple[socket.AddressFamily, Any] | None = None
        self._listener: socket.socket | None = None
        self._listening = False
        self._pairs: set[_Pair] = set()
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders command submission against the loop's shutdown
        self._closed = False
        self._running = False
        self._waker_r: socket.socket | None = None
        self._waker_w: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # ---- public API (any thread) ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port on 127.0.0.1; it stays the same across cut() and restore()."""
        if not self._port:
            raise ProxyError(f"{self.name}: not started")
        return self._port

    @property
    def connections(self) -> int:
        """How many connections are being forwarded right now."""
        return len(self._pairs)  # len() of a set is atomic under the GIL

    def start(self) -> Self:
        """Bind a free port, start the loop thread, and return self."""
        if self._thread is not None:
            raise ProxyError(f"{self.name}: already started")
        family, _, _, _, address = socket.getaddrinfo(
            self.target_host, self.target_port, type=socket.SOCK_STREAM
        )[0]
        self._target = (family, address)
        self._selector = selectors.DefaultSelector()
        self._listen_on(_bind(0))
        self._port = self._bound_listener().getsockname()[1]
        self._open_waker()
        self._running = True
        self._thread = threading.Thread(
            target=self._run, name=f"loopback-proxy-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def cut(self) -> None:
        """Close every forwarded connection and stop listening, like a server crash."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """Listen again on the same port; connects succeed once this returns."""
        self._call(self._do_restore)

    def stop(self) -> None:
        """Close everything and end the loop thread (safe to call twice, or unstarted)."""
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(ProxyError):  # already stopped: only the join is left
            self._call(self._do_stop)
        thread.join(COMMAND_TIMEOUT_S)
        if thread.is_alive():
            raise ProxyError(f"{self.name}: loop thread did not stop")

    @contextlib.contextmanager
    def outage(self) -> Iterator[Self]:
        """The service is unreachable inside the block and reachable again after it."""
        self.cut()
        try:
            yield self
        finally:
            self.restore()

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._port or "unstarted"
        return (
            f"<LoopbackProxy {self.name} {HOST}:{port} -> {self.target_host}:{self.target_port}"
            f" listening={self._listening} connections={self.connections}>"
        )

    # ---- commands: submitted by any thread, run by the loop thread --------------------------

    def _call(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop thread and wait, so the caller sees its effect at once."""
        if self._thread is None:
            raise ProxyError(f"{self.name}: not started")
        command = _Command(action)
        with self._lock:
            if self._closed:
                raise ProxyError(f"{self.name}: stopped")
            self._commands.put(command)
            self._wake()
        if not command.done.wait(COMMAND_TIMEOUT_S):
            raise ProxyError(f"{self.name}: loop did not answer within {COMMAND_TIMEOUT_S} s")
        if command.error is not None:
            raise command.error

    def _wake(self) -> None:
        assert self._waker_w is not None
        # A full socketpair buffer already holds a wake-up the loop has not read yet.
        with contextlib.suppress(BlockingIOError):
            self._waker_w.send(b"\0")

    def _run_commands(self) -> None:
        assert self._waker_r is not None
        with contextlib.suppress(BlockingIOError):
            while self._waker_r.recv(4096):
                pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command.action()
            except Exception as exc:  # the caller re-raises it; the loop goes on
                command.error = exc
            finally:
                command.done.set()

    def _do_cut(self) -> None:
        self._close_pairs()
        if not self._listening:
            return
        self._close_listener()
        # Keep the port bound but not listening: connects are refused (no listener), yet no
        # other socket can take the port before restore().
        try:
            self._listener = _bind(self._port)
        except OSError as exc:
            log.warning("%s: could not hold port %s while cut: %s", self.name, self._port, exc)

    def _do_restore(self) -> None:
        if self._listening:
            return
        sock = self._listener if self._listener is not None else _bind_retrying(self._port)
        self._listen_on(sock)

    def _do_stop(self) -> None:
        self._close_pairs()
        self._close_listener()
        self._running = False

    # ---- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._running:
                self._poll_once()
        except BaseException:
            log.exception("%s: proxy loop crashed", self.name)
            raise
        finally:
            self._shutdown()

    def _poll_once(self) -> None:
        for key, mask in self._selector.select(SELECT_TIMEOUT_S):
            if key.data == _WAKE:
                self._run_commands()
            elif key.data == _LISTEN:
                # A command earlier in this batch may have closed this listener.
                if key.fileobj is self._listener and self._listening:
                    self._accept_all()
            elif not key.data.pair.closed:
                self._service(key.data, mask)

    def _accept_all(self) -> None:
        """Accept the whole backlog, so a burst of connects does not wait a select round each."""
        listener = self._bound_listener()
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while in the backlog
                continue
            except OSError as exc:  # out of file descriptors, say: retry on the next round
                log.warning("%s: accept failed: %s", self.name, exc)
                return
            self.accepted += 1
            try:
                self._open_pair(client)
            except Exception:
                log.exception("%s: dropping a new connection", self.name)
                client.close()

    def _open_pair(self, client: socket.socket) -> None:
        assert self._target is not None
        family, address = self._target
        upstream = socket.socket(family, socket.SOCK_STREAM)
        for sock in (client, upstream):
            sock.setblocking(False)
            # Forward small requests at once: Nagle on either hop adds delayed-ACK stalls.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = upstream.connect_ex(address)
        pair = _Pair(client, upstream)
        self._pairs.add(pair)
        if result not in (0, errno.EINPROGRESS):
            self._drop_failed_connect(pair, result)
            return
        self._settle(pair)

    def _service(self, side: _Side, mask: int) -> None:
        """Handle one socket's events; a failure drops this pair only, never the loop."""
        pair = side.pair
        try:
            if mask & selectors.EVENT_WRITE:
                self._on_writable(side)
            if mask & selectors.EVENT_READ and not pair.closed:
                self._on_readable(side)
            if not pair.closed:
                self._settle(pair)
        except OSError as exc:  # resets and broken pipes: the peer went away
            log.debug("%s: closing a pair: %s", self.name, exc)
            self._close_pair(pair)
        except Exception:
            log.exception("%s: dropping a pair after an unexpected error", self.name)
            self._close_pair(pair)

    def _on_writable(self, side: _Side) -> None:
        pair = side.pair
        if pair.connecting and side is pair.upstream:
            error = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._drop_failed_connect(pair, error)
                return
            pair.connecting = False
        _flush(side)

    def _on_readable(self, side: _Side) -> None:
        pair = side.pair
        try:
            data = side.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            pair.draining = True  # half-close: no protocol here needs it, so end the pair
            return
        peer = pair.peer(side)
        peer.outbox += data
        if not (pair.connecting and peer is pair.upstream):
            _flush(peer)  # write now rather than after another select round

    def _settle(self, pair: _Pair) -> None:
        """Close a drained pair, else watch exactly the events each side needs."""
        if pair.draining and not pair.client.outbox and not pair.upstream.outbox:
            self._close_pair(pair)
            return
        for side in (pair.client, pair.upstream):
            self._watch(side, pair.wanted(side))

    def _watch(self, side: _Side, events: int) -> None:
        if events == side.events:
            return
        if not side.events:
            self._selector.register(side.sock, events, side)
        elif not events:
            self._selector.unregister(side.sock)
        else:
            self._selector.modify(side.sock, events, side)
        side.events = events

    def _drop_failed_connect(self, pair: _Pair, error: int) -> None:
        log.warning(
            "%s: cannot reach %s:%s: %s",
            self.name,
            self.target_host,
            self.target_port,
            os.strerror(error),
        )
        self._close_pair(pair)  # the client sees EOF, as if the server had hung up

    def _close_pair(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        for side in (pair.client, pair.upstream):
            self._close_socket(side.sock)
            side.events = 0

    def _close_pairs(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair)

    def _listen_on(self, sock: socket.socket) -> None:
        sock.listen(BACKLOG)
        self._selector.register(sock, selectors.EVENT_READ, _LISTEN)
        self._listener = sock
        self._listening = True

    def _bound_listener(self) -> socket.socket:
        if self._listener is None:
            raise ProxyError(f"{self.name}: no listening socket")
        return self._listener

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._close_socket(self._listener)
        self._listener = None
        self._listening = False

    def _close_socket(self, sock: socket.socket) -> None:
        # Not every socket is registered (a placeholder, a side with nothing to watch).
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _open_waker(self) -> None:
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._selector.register(self._waker_r, selectors.EVENT_READ, _WAKE)

    def _shutdown(self) -> None:
        """Runs last on the loop thread: release every socket, fail commands nobody will run."""
        self._close_pairs()
        self._close_listener()
        with self._lock:
            self._closed = True
            for sock in (self._waker_r, self._waker_w):
                if sock is not None:
                    self._close_socket(sock)
        self._selector.close()
        self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command.error = ProxyError(f"{self.name}: stopped")
            command.done.set()


def _bind(port: int) -> socket.socket:
    """A non-blocking TCP socket bound to 127.0.0.1:``port`` (0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Rebinding the port must work while connections closed by cut() sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_retrying(port: int) -> socket.socket:
    """Bind ``port`` again, waiting briefly for another socket to let go of it."""
    deadline = time.monotonic() + REBIND_TIMEOUT_S
    while True:
        try:
            return _bind(port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise ProxyError(f"cannot listen on {HOST}:{port} again: {exc}") from exc
        time.sleep(0.05)


def _flush(side: _Side) -> None:
    """Write as much of ``side``'s outbox as the kernel takes; the rest waits for writable."""
    while side.outbox:
        try:
            sent = side.sock.send(side.outbox)
        except (BlockingIOError, InterruptedError):
            return
        del side.outbox[:sent]
