"""Celery tasks: validate the message, then hand it to the chunk runner (worker/chunk.py); the
finalize task (a job whose every chunk finished before its submit had counted them).

Reliability rules (docs/reliability.md): acks_late + reject_on_worker_lost + prefetch 1, so a chunk
is acknowledged only once its part is written; a chunk that keeps failing is dead-lettered by the
runner after `max_attempts` instead of being redelivered forever. A message that cannot be handled
(malformed, a future schema version) but names its job and chunk is dead-lettered with the reason
(worker/rejected.py), never dropped. Importing this module connects the process's signal handlers
(worker/lifecycle.py), whose :data:`~worker.lifecycle.runner` the tasks use."""
from __future__ import annotations

import logging

from pydantic import ValidationError

from hnq.logs import chunk_context
from hnq.schema import ChunkTask
from hnq.settings import TASK_CLASSIFY, TASK_FINALIZE
from worker.app import app
from worker.lifecycle import runner
from worker.rejected import dead_letter_message

log = logging.getLogger("hardnet.worker")


def _reason(payload, e: ValidationError) -> str:
    v = payload.get("v") if isinstance(payload, dict) else None
    if isinstance(v, int) and not isinstance(v, bool) and v > 3:
        return (f"schema version {v}: this worker reads versions 2 and 3 (upgrade the workers, then "
                "hardnet redrive JOB)")
    errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors(include_input=False))
    return f"malformed chunk message ({errs[:500]})"


@app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def classify_chunk(self, payload: dict) -> dict | None:
    try:
        task = ChunkTask.model_validate(payload)
    except ValidationError as e:
        # Nothing to retry: it would fail the same way every time. Dead-lettered (not dropped) when
        # its job and chunk can be read, so the sweeper does not re-send it for ever.
        reason = _reason(payload, e)
        log.error("rejected a chunk message: %s", reason)
        dead_letter_message(runner.store(), payload, reason, runner.settings.output_policy())
        return None
    with chunk_context(task.job_id, task.chunk):  # this thread's log lines name the job and chunk
        return runner.run(task, self.retry)


@app.task(name=TASK_FINALIZE, acks_late=True, reject_on_worker_lost=True)
def finalize_job(job_id: str, dest: str | None = None) -> None:
    """Sent by the producer when every chunk finished before it had counted them all. Runs under
    the job's finalisation lease (hnq.jobs.finish): a second finaliser exits at once."""
    runner.finalize_job(job_id)
