"""Submitting a job: stream the sources into chunks and enqueue each as soon as it is full, so a
million-key prefix is never held in memory. The job is "sealed" with its totals at the end."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Iterable

from celery import Celery

from hnq.errors import ConfigError
from hnq.jobs import JobStore, new_job_id
from hnq.schema import MODELS, ChunkTask
from hnq.settings import TASK_CLASSIFY, TASK_FINALIZE, celery_config, redact_url
from hnq.storage import validate_destination
from producer.settings import ProducerSettings
from producer.sources import chunked

log = logging.getLogger("hardnet.producer")



def sender(s: ProducerSettings) -> Celery:
    """A Celery app that only sends (same transport config as the workers, no task code, no torch)."""
    app = Celery("hardnet-producer")
    app.conf.update(celery_config(s))
    return app


@dataclass
class Submitted:
    job_id: str
    total: int
    chunks: int
    dest: str | None
    model: str


class LocalJobs:
    """The producer's own memory of what it submitted (job id, broker, Redis run id)."""

    def __init__(self, s: ProducerSettings):
        self.path = s.state_dir / "jobs.jsonl"

    def add(self, job_id: str, broker: str, run_id: str | None) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"job_id": job_id, "broker": redact_url(broker), "run_id": run_id,
                                    "at": time.time()}) + "\n")
        except OSError as e:  # a read-only home must not stop a submit
            log.warning("could not remember job %s in %s: %s", job_id, self.path, e)

    def get(self, job_id: str) -> dict | None:
        try:
            with self.path.open() as f:
                for line in f:
                    d = json.loads(line)
                    if d.get("job_id") == job_id:
                        return d
        except (OSError, ValueError):
            return None
        return None


def submit(s: ProducerSettings, uris: Iterable[str], *, dest: str | None, model: str,
           chunk_size: int | None = None, store: JobStore | None = None, app: Celery | None = None) -> Submitted:
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if dest:
        dest = validate_destination(dest)
    size = chunk_size or s.chunk_size
    store = store or JobStore(s.broker_url, s.results_ttl_days)
    app = app or sender(s)
    job_id = new_job_id()
    store.create(job_id, model=model, dest=dest)
    try:
        run_id = store.r.info("server").get("run_id")
    except Exception:  # noqa: BLE001
        run_id = None
    LocalJobs(s).add(job_id, s.broker_url, run_id)
    total = chunks = 0
    try:
        with app.producer_or_acquire() as prod:
            for chunk in chunked(uris, size):
                task = ChunkTask(job_id=job_id, chunk=chunks, uris=chunk, model=model, dest=dest)
                app.send_task(TASK_CLASSIFY, args=[task.model_dump()], queue=s.queue, producer=prod)
                chunks += 1
                total += len(chunk)
    except BaseException:
        # Listing failed half way (or Ctrl-C): what was sent will be dropped by the workers.
        store.cancel(job_id)
        raise
    if total == 0:
        store.cancel(job_id)
        raise ConfigError("no images found in the given sources (looked for .jpg .jpeg .png .webp .gif "
                          ".tif .tiff .bmp)")
    if store.seal(job_id, total, chunks):
        # Every chunk finished before we had counted them: no worker saw a "last" chunk.
        app.send_task(TASK_FINALIZE, args=[job_id, dest], queue=s.queue)
    return Submitted(job_id=job_id, total=total, chunks=chunks, dest=dest, model=model)


def requeue_dead(s: ProducerSettings, store: JobStore, job_id: str, chunk: int | None = None,
                 app: Celery | None = None) -> int:
    """Send a job's dead-lettered chunks again (after fixing what made them fail)."""
    info = store.info(job_id)
    if info is None:
        raise ConfigError(f"unknown job {job_id}")
    app = app or sender(s)
    n = 0
    for d in store.dead_letters(job_id):
        if chunk is not None and d.chunk != chunk:
            continue
        store.reset_attempts(job_id, d.chunk)
        task = ChunkTask(job_id=job_id, chunk=d.chunk, uris=d.uris, model=info.model or "hardnet68",
                         dest=info.dest)
        app.send_task(TASK_CLASSIFY, args=[task.model_dump()], queue=s.queue)
        n += 1
    return n
