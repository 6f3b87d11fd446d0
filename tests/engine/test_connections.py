"""One Redis client per process (rebuilt after a fork), and the per-attempt claims."""

from __future__ import annotations

import os

import pytest
from rq.job import Job

from sagas.engine import connection as engine_connection
from sagas.engine.connection import queue, redis
from sagas.engine.executor import run_step
from sagas.engine.idempotency import claim, claim_name
from sagas.services import start

pytestmark = pytest.mark.django_db(transaction=True)


def server_counters() -> tuple[int, int]:
    """Connections the server accepted so far, and INFO commands it answered."""
    stats = redis().info("stats")
    info_calls = redis().info("commandstats").get("cmdstat_info", {}).get("calls", 0)
    return int(stats["total_connections_received"]), int(info_calls)


def perform_queued_steps() -> int:
    """Run queued step jobs here, as a work horse would, without a worker's own
    connections (its pubsub and dequeue) in the count."""
    done = 0
    while queue().count:
        jid = queue().pop_job_id()
        job = Job.fetch(jid, connection=redis())
        if str(job.func_name).endswith("run_step"):
            run_step(*job.args)
            done += 1
    return done


def test_steps_reuse_one_connection_and_one_version_check():
    assert redis() is redis()
    assert queue() is queue()
    assert queue().connection is redis()
    start("chaos", {})  # warm up: this process's client exists and knows the version
    perform_queued_steps()
    connections, info_calls = server_counters()
    tasks = [start("chaos", {})[0] for _ in range(3)]
    steps = 0
    while (ran := perform_queued_steps()) > 0:
        steps += ran
    assert steps >= 9
    for task in tasks:
        task.refresh_from_db()
        assert task.status == "completed"
    new_connections, new_info_calls = server_counters()
    # 9 steps, each with a lock, a claim and the next step's enqueue, and 3 starts: no new
    # connection per call, no server version check per enqueue.
    assert new_connections - connections <= 1
    assert new_info_calls - info_calls <= 2  # the counter reads themselves


def test_a_forked_child_builds_its_own_client():
    parent = redis()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new client, which works; never the parent's sockets
        os.close(read)
        ok = redis() is not parent and redis().ping() and redis() is redis()
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"1"
    assert redis() is parent
    assert engine_connection.redis().ping()


def test_a_second_claimant_of_an_attempt_gets_false():
    name = claim_name("task-1", "charge", "action", 2)
    assert name == "task-1:charge:2"
    assert claim(redis(), name, "worker-a") is True
    assert claim(redis(), name, "worker-b") is False
    assert claim(redis(), name, "worker-a") is False  # not even the first claimant twice
    assert claim(redis(), claim_name("task-1", "charge", "action", 3), "worker-b") is True
    assert claim(redis(), claim_name("task-1", "charge", "compensation", 2), "worker-b")
