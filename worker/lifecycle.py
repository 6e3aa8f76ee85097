"""The life of a worker process, on Celery's signals: the model preloaded before the first chunk,
the metrics endpoint started, the ready line and the heartbeat that publishes what this worker
accepts (hnq.fleet; read by `hardnet submit`), the chunks-in-flight gauge, the memory guard
that recycles the process, and the background finaliser (jobs whose last chunk this process
completed are finalised on its own threads, outside any chunk's message, under the job's lease).

Imported by worker.tasks (whose tasks run on :data:`runner`), so its handlers are connected in
every process that loads the tasks (Celery imports worker.tasks through the app's ``include``)."""
from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from celery import signals

from hnq.errors import ConfigError
from hnq.fleet import Heartbeat, WorkerCaps
from hnq.jobs.finish import finalize_or_fail
from hnq.settings import TASK_CLASSIFY
from worker import metrics, shutdown
from worker.app import admission, settings
from worker.chunk import ChunkRunner, rss_mb

log = logging.getLogger("hardnet.worker")

#: This process's chunk labelling (its engines are built by :func:`_preload`).
runner = ChunkRunner(settings, admission)

# --- the finaliser ------------------------------------------------------------------------------
#: tries of one finalisation (a transient storage error) before the job is marked failed
FINALIZE_ATTEMPTS = 3
_finalizer = ThreadPoolExecutor(2, thread_name_prefix="hardnet-finalize")


def _finalize(job_id: str) -> None:
    try:
        finalize_or_fail(runner.store(), job_id, settings.output_policy(), attempts=FINALIZE_ATTEMPTS)
    except Exception as e:  # noqa: BLE001 - Redis gone: the sweeper finalises the job later
        log.error("job %s: finalisation failed (%s: %s); the sweeper will finish it", job_id, type(e).__name__, e)


def finalize_soon(job_id: str) -> None:
    """The job's last chunk is done: finalise it on this process's finaliser threads, so the chunk's
    message is acknowledged now. If this process dies first, the job stays complete and unfinished
    and the sweeper finalises it (after the lease, if one was taken, expires)."""
    try:
        _finalizer.submit(_finalize, job_id)
    except RuntimeError:      # shutting down: finalise here, before this chunk's task returns
        _finalize(job_id)


runner.job_complete = finalize_soon


@signals.worker_shutdown.connect
def _finish_finalising(**_):
    # Sent once the pool has stopped: a finalisation in progress ends (manifest, state) before exit.
    _finalizer.shutdown(wait=True)


@signals.worker_shutdown.connect
def _close_engines(**_):
    # Chunks handed back mid-batch (worker.shutdown) leave the engine busy: stop its threads
    # before the interpreter exits.
    shutdown.close_engines(runner.built)

# --- memory guard -------------------------------------------------------------------------------
#: Set when this process asked to be recycled; `hardnet worker` re-executes itself when it sees it.
recycle_requested = threading.Event()


@signals.task_postrun.connect
def _memory_guard(**_):
    limit = settings.max_memory_per_child_mb
    if not limit or recycle_requested.is_set():
        return
    rss = rss_mb()
    if rss > limit:
        log.warning("worker RSS %.0f MiB exceeds HARDNET_MAX_MEMORY_PER_CHILD_MB=%d: restarting after this chunk",
                    rss, limit)
        recycle_requested.set()
        # Warm shutdown: the current chunk is already acknowledged; nothing in flight is lost.
        os.kill(os.getpid(), signal.SIGTERM)


# --- the heartbeat: what this worker accepts, for `hardnet submit`'s check (hnq.fleet) ----------
_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _say_ready(sender=None, **_):
    # Logged here, not at load time: Celery has set up its log handlers (and our format) by now.
    # The heartbeat's first beat comes before Celery's "ready." line (sent after this signal).
    global _heartbeat
    try:
        _heartbeat = Heartbeat.for_consumer(runner.store().r, settings, sender).start()
        accepts = _heartbeat.caps.line()
    except Exception as e:  # noqa: BLE001 - a worker without a heartbeat still labels
        log.warning("could not start this worker's heartbeat (submit will not see it): %s", e)
        accepts = WorkerCaps.of(settings, hostname="-").line()
    ctx = runner.built
    if ctx is not None:
        log.info("worker ready: %s; accepts: %s", ctx.summary, accepts)
    else:
        log.info("worker accepts: %s", accepts)


@signals.worker_shutdown.connect
def _stop_heartbeat(**_):
    if _heartbeat is not None:
        _heartbeat.stop()


# --- metrics (worker.metrics; HARDNET_METRICS_PORT) ---------------------------------------------
def _live_engines() -> list:
    ctx = runner.built
    return ctx.engines.live() if ctx is not None else []


def _start_metrics(prefork: bool) -> None:
    """Serve /metrics, once per process, before the model loads (a port in use fails in seconds,
    not after the weights). Refused with a prefork pool: each forked child would count its own
    chunks in its own registry, and this process's endpoint would show none of them. (worker.app
    sets the threads pool, which even `celery worker --pool=prefork` does not override here, so
    this guard is for a changed configuration, as _preload's own prefork check is.)"""
    port = settings.metrics_port
    if port is None:
        return
    if prefork:
        raise ConfigError("HARDNET_METRICS_PORT needs the threads (or solo) pool: with prefork each "
                          "child process would count its own chunks and this endpoint would show "
                          "none of them (`hardnet worker` uses the threads pool)")
    metrics.register_runtime(_live_engines)
    metrics.serve(port)


@signals.worker_ready.connect
def _log_metrics(**_):
    # Logged here, not when the server starts (worker_init): Celery's logging is set up by now.
    url = metrics.served_at()
    if url:
        log.info("metrics on %s (HARDNET_METRICS_PORT)", url)


@signals.task_prerun.connect
def _chunk_started(sender=None, **_):
    if getattr(sender, "name", None) == TASK_CLASSIFY:
        metrics.CHUNKS_IN_FLIGHT.inc()


@signals.task_postrun.connect
def _chunk_ended(sender=None, **_):
    # Sent after every task run, returned, raised or retried (celery.app.trace).
    if getattr(sender, "name", None) == TASK_CLASSIFY:
        metrics.CHUNKS_IN_FLIGHT.dec()


@signals.worker_init.connect
def _preload(sender=None, **_):
    """Load the model before taking the first chunk: a worker whose weights can't be loaded stops
    here with the reason, instead of failing (and dead-lettering) every chunk it takes. Not in a
    prefork parent, where CUDA would then be unusable in the children. The metrics endpoint starts
    first."""
    prefork = "prefork" in str(getattr(sender, "pool_cls", "")).lower()
    try:
        _start_metrics(prefork)
    except ConfigError as e:
        log.critical("cannot start the worker: %s", e)
        raise SystemExit(78) from e  # EX_CONFIG
    if prefork:
        return
    try:
        runner.context()
    except Exception as e:  # noqa: BLE001
        # A worker that cannot label must not take chunks: it would fail and dead-letter them all.
        # SystemExit is not swallowed by Celery's signal dispatch (it catches Exception).
        log.critical("cannot start the worker: %s", e)
        raise SystemExit(78) from e  # EX_CONFIG
    # What start-up made (torch's and Celery's modules, the model: ~400,000 objects) lives as
    # long as the process: out of the collector's sight, so that its full collections walk only
    # what the chunks make (each walked all of it: ~0.1 s of CPU).
    gc.collect()
    gc.freeze()
