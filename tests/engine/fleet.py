"""A fleet of chaos tasks built in SQL (Postgres), for the reaper's scale tests and its
one-off measurement at a million tasks.

Per thousand tasks, ``active_per_mille`` are active, half of them with a live attempt
(heartbeat fresh for ten minutes, no wake-up time) and half waiting an hour for a retry
(wake-up time an hour away): an idle fleet, where the reaper has nothing to do. The rest
completed. Every task has its three steps, and every step that ran has its attempt.
"""

from __future__ import annotations

import time

from django.db import connection

TASKS = """
INSERT INTO sagas_taskinstance (
    id, saga, status, input, business_key, correlation_id, trace_id, version,
    compensation_reason, current_step, error_summary, created_at, updated_at, started_at,
    finished_at, cancel_reason, resolution_note, deadline_at, wake_at
)
SELECT
    gen_random_uuid(), 'chaos', kind.status,
    jsonb_build_object('sleep_ms', jsonb_build_object('ship', g %% 500), 'note', md5(g::text)),
    NULL, md5(g::text), substr(md5((g + 1)::text), 1, 32), 3, '',
    CASE WHEN kind.status = 'completed' THEN '' ELSE 'charge' END, '',
    now() - (%(offset)s + g) * interval '1 second', now() - interval '1 minute',
    now() - (%(offset)s + g) * interval '1 second',
    CASE WHEN kind.status = 'completed' THEN now() - interval '1 minute' END, '', '', NULL,
    CASE WHEN kind.status = 'waiting_retry' THEN now() + interval '1 hour 10 seconds' END
FROM generate_series(1, %(count)s) AS g
CROSS JOIN LATERAL (SELECT CASE
    WHEN g %% 1000 >= %(active_per_mille)s THEN 'completed'
    WHEN g %% 2 = 0 THEN 'running'
    ELSE 'waiting_retry' END AS status) AS kind
RETURNING id
"""

STEPS = """
INSERT INTO sagas_steprecord (
    task_id, index, name, status, critical, version, attempt_count,
    compensation_attempt_count, data, error, compensation_error, trace_id, span_id, progress,
    progress_message, started_at, finished_at, next_attempt_at, job_id, attempt_budget_base,
    compensation_budget_base, after, compensate_alone, "group", group_mode, is_group, level
)
SELECT
    t.id, s.index, s.name, s.status, true, 2, s.attempts, 0,
    CASE WHEN s.status = 'succeeded' THEN jsonb_build_object('ref', s.name || '-' || t.id) END,
    CASE WHEN s.status = 'waiting_retry' THEN 'ChaosFailure: scripted' ELSE '' END, '',
    t.trace_id, substr(md5(t.id::text || s.name), 1, 16),
    CASE WHEN s.status = 'succeeded' THEN 100 ELSE 0 END, '',
    CASE WHEN s.attempts > 0 THEN t.started_at END,
    CASE WHEN s.status = 'succeeded' THEN t.started_at + interval '1 second' END,
    CASE WHEN s.status = 'waiting_retry' THEN now() + interval '1 hour' END,
    CASE WHEN s.attempts > 0 OR s.status = 'waiting_retry' THEN
        'saga-' || t.id || '-' || s.name || '-a' || (s.attempts + (s.status = 'waiting_retry')::int)
    ELSE '' END,
    0, 0, s.after, false, '', '', false, s.index
FROM sagas_taskinstance t
CROSS JOIN LATERAL (VALUES
    (0, 'reserve', 'succeeded', 1, '[]'::jsonb),
    (1, 'charge', CASE t.status WHEN 'completed' THEN 'succeeded' ELSE t.status END,
        1, '["reserve"]'::jsonb),
    (2, 'ship', CASE t.status WHEN 'completed' THEN 'succeeded' ELSE 'pending' END,
        CASE t.status WHEN 'completed' THEN 1 ELSE 0 END, '["charge"]'::jsonb)
) AS s(index, name, status, attempts, after)
WHERE t.id = ANY(%(ids)s)
"""

ATTEMPTS = """
INSERT INTO sagas_stepattempt (
    step_id, kind, number, outcome, worker, job_id, lock_token, lock_key, started_at,
    heartbeat_at, heartbeat_expires_at, finished_at, error, traceback
)
SELECT
    s.id, 'action', 1,
    CASE s.status WHEN 'succeeded' THEN 'succeeded' WHEN 'running' THEN 'running'
        ELSE 'failed' END,
    'fleet-worker', s.job_id, md5(s.id::text), 'sagas:lock:' || s.task_id, s.started_at,
    CASE WHEN s.status = 'running' THEN now() ELSE s.started_at END,
    CASE WHEN s.status = 'running' THEN now() + interval '10 minutes' END,
    CASE WHEN s.status = 'running' THEN NULL ELSE s.started_at + interval '1 second' END,
    CASE WHEN s.status = 'waiting_retry' THEN 'ChaosFailure: scripted' ELSE '' END, ''
FROM sagas_steprecord s
WHERE s.task_id = ANY(%(ids)s) AND s.attempt_count > 0
"""

CHUNK = 100_000


def build_fleet(count: int, active_per_mille: int = 30, offset: int = 0) -> float:
    """Insert ``count`` tasks (and their steps and attempts); seconds it took."""
    began = time.monotonic()
    with connection.cursor() as cursor:
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            params = {"count": size, "active_per_mille": active_per_mille, "offset": offset + start}
            cursor.execute(TASKS, params)
            ids = [row[0] for row in cursor.fetchall()]
            cursor.execute(STEPS, {"ids": ids})
            cursor.execute(ATTEMPTS, {"ids": ids})
        cursor.execute("ANALYZE sagas_taskinstance, sagas_steprecord, sagas_stepattempt")
    return time.monotonic() - began
