"""A worker asked to stop — SIGTERM from Kubernetes, `docker stop`, a node drained on a spot notice,
or the memory guard — stops taking chunks at once, lets the chunks it runs finish for
``HARDNET_SHUTDOWN_GRACE`` seconds, then hands every unfinished one back to the queue and exits
(docs/reliability.md, "Preemption").

How: Celery's warm shutdown on SIGTERM (``worker_shutting_down``) cancels the task consumer and
waits for the pool's threads with no time limit; this module gives that wait its end. worker.app
calls :func:`request` from that signal (the deadline is set) and closes the admission gate; each
chunk's task polls :func:`due` while it waits on the engine (worker.chunk.run_in_engine), and when
the grace is over it cancels the chunk's images in the engine (ChunkCancelled), keeps the records
already finished (hnq.jobs.parts.keep_records) and raises :class:`HandedBack`: a Celery ``Reject``
with ``requeue=True``, so kombu puts the message back in the Redis list at once (not after the
visibility timeout). A chunk that was not started yet when the signal came is handed back before it
touches anything.

Why not Celery's own soft shutdown (``worker_soft_shutdown_timeout`` with ``REMAP_SIGTERM=SIGQUIT``):
it ends in a cold shutdown that cancels running requests through ``pool.terminate_job``, which the
threads pool does not implement (tried with Celery 5.7.0: "NotImplementedError: TaskPool does not
implement kill_job", then the worker still waited for the task and exited 1). A thread cannot be
killed; a chunk that watches a deadline can stop itself cleanly.

A worker killed outright (SIGKILL, OOM, a lost node) gets none of this: its chunks stay unacked in
Redis and come back after ``HARDNET_VISIBILITY_TIMEOUT``, as before.
"""
from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time

from celery.exceptions import Reject

log = logging.getLogger("hardnet.worker")

#: Seconds from the end of the grace to the process's exit, at most, that the platform's kill must
#: leave on top of HARDNET_SHUTDOWN_GRACE: a task notices the deadline within a second (it polls
#: every second), keeps its records and rejects its message, then Celery closes its connection and
#: the finaliser and engines stop (measured: tests/integration/test_preemption.py prints it).
#: terminationGracePeriodSeconds and stop_grace_period >= HARDNET_SHUTDOWN_GRACE + this
#: (tests/unit/test_deploy.py checks the deploy files).
EXIT_MARGIN_S = 10

_lock = threading.Lock()
_deadline: float | None = None


class HandedBack(Reject):
    """A chunk given back to the queue because its worker is stopping: kombu re-queues its message
    at once (``requeue=True``); its finished records were kept for the next attempt."""

    def __init__(self, reason: str):
        super().__init__(reason, requeue=True)


def request(grace_s: float, why: str = "SIGTERM") -> float:
    """The worker was asked to stop: from now on no chunk starts, and chunks still running after
    ``grace_s`` seconds are handed back. A second request keeps the first deadline. Returns the
    seconds left. Called from a signal handler: only sets state (the log line is the caller's)."""
    global _deadline
    with _lock:
        if _deadline is None:
            _deadline = time.monotonic() + max(0.0, grace_s)
            threading.Thread(target=_watch, args=(_deadline + EXIT_MARGIN_S / 2,), daemon=True,
                             name="hardnet-shutdown-watch").start()
        return max(0.0, _deadline - time.monotonic())


def _watch(at: float) -> None:
    """Half-way through the exit margin and still alive: say what the threads are doing (the
    platform's SIGKILL may come next; the chunks were handed back already)."""
    time.sleep(max(0.0, at - time.monotonic()))
    log.warning("still running %.0fs after the shutdown grace; the threads' stacks follow on stderr",
                EXIT_MARGIN_S / 2)
    faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)


def stopping() -> bool:
    """True once the worker was asked to stop: take and start no chunk."""
    return _deadline is not None


def due() -> bool:
    """True once the grace is over: hand running chunks back."""
    d = _deadline
    return d is not None and time.monotonic() >= d


def reset() -> None:
    """Forget a stop request (a process that re-executes itself starts afresh anyway; for tests)."""
    global _deadline
    with _lock:
        _deadline = None


def close_engines(ctx, timeout_s: float = 10.0) -> None:
    """At the end of a shutdown (Celery's ``worker_shutdown``: the pool has stopped): close the
    engines of ``ctx`` (worker.chunk.Context, or None when none was built) and wait for their
    device and decode threads to leave torch. A chunk handed back mid-batch leaves the engine
    busy, and a daemon thread still inside a torch op while the interpreter exits aborts the
    process ("terminate called without an active exception", exit 134 instead of 0)."""
    if ctx is None:
        return
    ctx.engines.close_all()
    end = time.monotonic() + timeout_s
    for t in threading.enumerate():
        if t.name.startswith(("hnq-device", "hnq-decode")):
            t.join(max(0.0, end - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t.name.startswith(("hnq-device", "hnq-decode"))]
    if left:
        log.warning("engine threads still running at exit: %s", ", ".join(left))
