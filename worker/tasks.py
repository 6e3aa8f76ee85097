"""Celery tasks: validate the message, then hand it to the chunk runner (worker/chunk.py).

Reliability rules (docs/reliability.md): acks_late + reject_on_worker_lost + prefetch 1, so a chunk
is acknowledged only once its part is written; a chunk that keeps failing is dead-lettered by the
runner after `max_attempts` instead of being redelivered forever. Importing this module connects
the process's signal handlers (worker/lifecycle.py), whose :data:`~worker.lifecycle.runner` the
tasks use."""
from __future__ import annotations

import logging

from pydantic import ValidationError

from hnq.logs import chunk_context
from hnq.schema import ChunkTask
from hnq.settings import TASK_CLASSIFY, TASK_FINALIZE
from worker.app import app
from worker.lifecycle import runner

log = logging.getLogger("hardnet.worker")


@app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def classify_chunk(self, payload: dict) -> dict | None:
    try:
        task = ChunkTask.model_validate(payload)
    except ValidationError as e:
        # Nothing to retry: a malformed message would fail the same way every time.
        v = payload.get("v") if isinstance(payload, dict) else None
        if isinstance(v, int) and v > 3:
            log.error("rejected a chunk message of schema version %s: this worker reads versions 2 and 3 "
                      "(upgrade it); the sweeper re-sends the chunk for another worker", v)
        else:
            log.error("rejected a malformed chunk message: %s", e.errors(include_input=False))
        return None
    with chunk_context(task.job_id, task.chunk):  # this thread's log lines name the job and chunk
        return runner.run(task, self.retry)


@app.task(name=TASK_FINALIZE, acks_late=True, reject_on_worker_lost=True)
def finalize_job(job_id: str, dest: str | None = None) -> None:
    """Sent by the producer when every chunk finished before it had counted them all."""
    runner.finalize_job(job_id)
