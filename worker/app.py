"""The Celery app of the workers (thin: configuration only; the work is in worker.tasks).

    celery -A worker.app worker -Q hardnet      # one process per GPU
    hardnet worker                              # the same, wrapped

The pool comes from our settings, not from Celery's default (prefork): the **threads** pool with
``HARDNET_CHUNKS_IN_FLIGHT`` threads, each running one chunk's task, all feeding the process's one
engine (CUDA is initialised once, in this process; prefork children could not use it). With
``acks_late`` and prefetch multiplier 1 the worker reserves exactly as many messages as it has
chunks in flight.
"""
from __future__ import annotations

import logging

from celery import Celery, signals

from hnq import logs
from hnq.settings import celery_config, lean_messages
from worker import transport
from worker.settings import WorkerSettings

transport.install()

settings = WorkerSettings()
app = Celery("hardnet", include=["worker.tasks", "worker.sweeper"])
app.conf.update(celery_config(settings))
app.conf.update(worker_pool="threads", worker_concurrency=settings.chunks_in_flight)
lean_messages(app)  # retries re-send the message: keep it small
if settings.log_format == "json":
    logging.captureWarnings(True)  # warnings become log lines (JSON) instead of raw stderr text


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger=None, **_):
    """Celery set up its handlers: redact them, and make them JSON with HARDNET_LOG_FORMAT=json."""
    logs.install(logger, settings.log_format)


@signals.celeryd_after_setup.connect
def _worker_name(sender=None, **_):
    logs.set_worker(str(sender))
