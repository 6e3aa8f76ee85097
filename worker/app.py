"""The Celery app of the workers (thin: configuration only; the tasks are in worker.tasks, the work
in worker.chunk, the process's signal handlers in worker.lifecycle).

    celery -A worker.app worker -Q hardnet      # one process per GPU
    hardnet worker                              # the same, wrapped

The pool comes from our settings, not from Celery's default (prefork): the **threads** pool with
``HARDNET_MAX_CHUNKS_IN_FLIGHT`` threads, each running one chunk's task, all feeding the process's
one engine (CUDA is initialised once, in this process; prefork children could not use it). With
``acks_late`` and prefetch multiplier 1 the worker reserves only messages it is running; how many
it takes is decided by worker.admission (``HARDNET_CHUNKS_IN_FLIGHT`` at least, more while they
hold fewer than ``HARDNET_IMAGES_IN_FLIGHT`` images).

Stopping (worker.shutdown): on SIGTERM Celery's warm shutdown stops the consumer; the admission gate
closes at once too, and chunks still running after ``HARDNET_SHUTDOWN_GRACE`` seconds are handed
back to the queue. Celery's soft shutdown (``worker_soft_shutdown_timeout``) stays off: it needs a
pool that can kill a task, which the threads pool cannot (worker/shutdown.py says more).
"""
from __future__ import annotations

import logging

from celery import Celery, signals

from hnq import logs
from hnq.settings import celery_config, lean_messages
from worker import dispatcher, shutdown, transport
from worker.admission import Admission
from worker.settings import WorkerSettings

settings = WorkerSettings()
#: told the images to hold once the engine (its batch size) is built: worker.chunk.Context
admission = Admission(settings.chunks_in_flight, settings.pool_size)
# A worker asked to stop takes nothing more, even before Celery has cancelled its consumer.
transport.install(gate=lambda: not shutdown.stopping() and admission(), on_poll=dispatcher.wake)

app = Celery("hardnet", include=["worker.tasks", "worker.lifecycle", "worker.sweeper"])
app.conf.update(celery_config(settings))
app.conf.update(worker_pool="threads", worker_concurrency=settings.pool_size,
                # the grace is ours (worker.shutdown): Celery's soft shutdown cannot stop a thread
                worker_soft_shutdown_timeout=0.0, worker_enable_soft_shutdown_on_idle=False)
lean_messages(app)  # retries re-send the message: keep it small
if settings.log_format == "json":
    logging.captureWarnings(True)  # warnings become log lines (JSON) instead of raw stderr text


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger=None, **_):
    """Celery set up its handlers: redact them, and make them JSON with HARDNET_LOG_FORMAT=json."""
    logs.install(logger, settings.log_format)


@signals.worker_ready.connect
def _start_dispatcher(**_):
    """Jobs' ready chunks into the queue, by priority and in turn (worker.dispatcher)."""
    dispatcher.start(app, settings)


@signals.celeryd_after_setup.connect
def _worker_name(sender=None, **_):
    logs.set_worker(str(sender))


@signals.worker_shutting_down.connect
def _stop_requested(sig=None, how=None, **_):
    """SIGTERM (or SIGINT, SIGQUIT): no chunk starts from now on; running chunks get
    HARDNET_SHUTDOWN_GRACE seconds, then go back to the queue (worker.shutdown)."""
    left = shutdown.request(settings.shutdown_grace, str(sig))
    logging.getLogger("hardnet.worker").warning(
        "%s: stopping: no new chunks; chunks still running in %.0fs go back to the queue with their "
        "finished records (HARDNET_SHUTDOWN_GRACE=%g)", sig, left, settings.shutdown_grace)
