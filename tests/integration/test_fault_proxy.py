"""The fault-injection proxy against the real services: bytes arrive intact, cuts really cut."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from django.conf import settings
from django.db import connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from sagas.embedded import free_port
from tests.engine import conftest as engine
from tests.engine.conftest import database_url_via, redis_url_via, wait_for
from tests.faults import CHUNK, HIGH_WATER, LoopbackProxy, ProxyError

# The fixtures live with the engine tests that use them; naming them here is what lets pytest
# offer them outside tests/engine (an import would read as unused to the linter).
redis_proxy = engine.redis_proxy
postgres_proxy = engine.postgres_proxy

KEY = "fault-proxy-test"


def client(proxy: LoopbackProxy) -> redis.Redis:
    # No retries: the test wants the first failure, not redis-py reconnecting around it.
    return redis.Redis.from_url(redis_url_via(proxy), retry=Retry(NoBackoff(), 0), socket_timeout=5)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def open_fds() -> set[str]:
    return {path.name for path in Path("/proc/self/fd").iterdir()}


def test_redis_through_the_proxy_until_cut_and_after_restore(redis_proxy):
    first = client(redis_proxy)
    assert first.ping()
    value = os.urandom(1024 * 1024)
    first.set(KEY, value)
    try:
        assert first.get(KEY) == value
        assert redis_proxy.connections == 1
        port = redis_proxy.port

        redis_proxy.cut()
        assert redis_proxy.connections == 0
        with pytest.raises(redis.exceptions.ConnectionError):
            first.ping()
        assert refused(port)
        with pytest.raises(redis.exceptions.ConnectionError):
            client(redis_proxy).ping()

        redis_proxy.restore()
        assert redis_proxy.port == port
        second = client(redis_proxy)
        assert second.get(KEY) == value  # the same server answers, with its data
        assert first.ping()  # the old client reconnects on its own now
        second.close()
    finally:
        with redis.Redis.from_url(settings.REDIS_URL) as direct:
            direct.delete(KEY)
        first.close()


def test_a_slow_reader_gets_every_byte_in_order(redis_proxy):
    """Replies far bigger than the socket buffers, read late: the proxy must buffer, not drop."""
    value = os.urandom(1024 * 1024)
    with redis.Redis.from_url(settings.REDIS_URL) as direct:
        direct.set(KEY, value)
    gets = 40
    reply = b"$%d\r\n%s\r\n" % (len(value), value)
    try:
        with socket.create_connection(("127.0.0.1", redis_proxy.port), timeout=10) as sock:
            sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(KEY), KEY.encode()) * gets)
            # Not reading: the kernel buffers fill and the proxy's outbox grows, but only to its
            # high-water mark; then it stops reading from Redis until this client catches up.
            wait_for(lambda: redis_proxy.connections == 1, timeout=10, interval=0.05)
            (pair,) = redis_proxy._pairs
            wait_for(lambda: len(pair.client.outbox) >= HIGH_WATER, timeout=10, interval=0.05)
            time.sleep(0.3)
            assert len(pair.client.outbox) < HIGH_WATER + CHUNK
            received = bytearray()
            while len(received) < len(reply) * gets:
                chunk = sock.recv(1024 * 1024)
                assert chunk, f"EOF after {len(received)} bytes"
                received += chunk
        assert received == reply * gets
    finally:
        with redis.Redis.from_url(settings.REDIS_URL) as direct:
            direct.delete(KEY)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_through_the_proxy_until_cut_and_after_restore(postgres_proxy):
    url = database_url_via(postgres_proxy)
    first = psycopg.connect(url, connect_timeout=5)
    try:
        assert first.execute("SELECT 1").fetchone() == (1,)
        postgres_proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            first.execute("SELECT 1")
    finally:
        first.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)

    postgres_proxy.restore()
    with psycopg.connect(url, connect_timeout=5) as second:
        row = second.execute("SELECT current_database()").fetchone()
    assert row == (connection.settings_dict["NAME"],)


def test_many_concurrent_clients(redis_proxy):
    clients, rounds = 20, 50
    all_connected, go = threading.Barrier(clients + 1), threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run(number: int) -> None:
        key = f"{KEY}-{number}"
        conn = client(redis_proxy)
        try:
            conn.ping()
            all_connected.wait(10)
            go.wait(10)
            for round_ in range(rounds):
                payload = f"{number}:{round_}:".encode() + os.urandom(number * 500)
                conn.set(key, payload)
                assert conn.get(key) == payload
            conn.delete(key)
        except BaseException as exc:
            errors.append(exc)
            all_connected.abort()
            go.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    all_connected.wait(10)
    assert redis_proxy.connections == clients  # all forwarded at once, by one thread
    go.wait(10)
    for thread in threads:
        thread.join(60)
    assert not errors
    assert redis_proxy.accepted == clients
    wait_for(lambda: redis_proxy.connections == 0, timeout=10, interval=0.05)


def test_an_unreachable_upstream_closes_the_client():
    with LoopbackProxy("127.0.0.1", free_port(), name="nowhere") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            assert sock.recv(1) == b""  # EOF at once, rather than a hang
        assert proxy.accepted == 1
        wait_for(lambda: proxy.connections == 0, timeout=5, interval=0.05)


def test_outage_and_stop_leave_no_thread_or_socket_behind():
    fds_before, threads_before = open_fds(), set(threading.enumerate())
    server = urlsplit(settings.REDIS_URL)
    proxy = LoopbackProxy(server.hostname or "127.0.0.1", server.port or 6379, name="leak").start()
    idle = client(proxy)
    assert idle.ping()
    with proxy.outage():
        assert refused(proxy.port)
    assert idle.ping()  # reconnected after the outage; left open across stop()
    proxy.stop()
    proxy.stop()  # idempotent
    with pytest.raises(ProxyError):
        proxy.cut()
    idle.close()
    assert set(threading.enumerate()) == threads_before
    assert open_fds() == fds_before
