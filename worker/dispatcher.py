"""The worker's dispatcher: keeps the Celery queue it consumes topped up from the jobs' ready lists,
by priority and in turn between jobs (the rule: hnq.jobs.dispatch).

It runs in a thread of its own, woken before each BRPOP of the consumer (worker.transport calls
:func:`wake`, which never blocks the event loop) and every half second; each wake moves chunks in
until the queue holds ``HARDNET_DISPATCH_AHEAD`` messages. Every worker dispatches: there is no
dispatcher process to run or to lose, and two dispatchers never serve the same turn (hnq.jobs.dispatch)."""
from __future__ import annotations

import logging
import threading
import time

from hnq.jobs.dispatch import Dispatcher
from hnq.jobs.store import JobStore

log = logging.getLogger("hardnet.dispatch")

#: seconds between dispatches when nothing wakes the thread (a consumer blocked in BRPOP)
TICK_S = 0.5
#: seconds between looks for chunks a dead dispatcher took and never sent
RECOVER_EVERY_S = 2.0

_wake = threading.Event()
_queues: dict[str, None] = {}
_started = threading.Event()


def wake(queues=()) -> None:
    """The consumer is about to wait for a message from ``queues``: top them up now."""
    for q in queues:
        if q not in _queues:
            _queues[q] = None
    _wake.set()


def _loop(app, settings) -> None:
    store = JobStore.from_settings(settings)
    d = Dispatcher(store, app, settings.dispatch_ahead)
    failing_since = None
    next_recover = 0.0
    while True:
        _wake.wait(TICK_S)
        _wake.clear()
        try:
            recover = time.monotonic() >= next_recover
            for q in list(_queues) or [settings.queue]:
                if recover:         # chunks a dead dispatcher took and never sent (hnq.jobs.dispatch)
                    d.recover(q)
                d.top_up(q)
            if recover:
                next_recover = time.monotonic() + RECOVER_EVERY_S
            if failing_since is not None:
                log.warning("dispatch works again (after %.0fs)", time.monotonic() - failing_since)
                failing_since = None
        except Exception as e:  # noqa: BLE001 - Redis away: try again, say so once
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning("dispatch failed (will try again): %s: %s", type(e).__name__, e)
            time.sleep(TICK_S)


def start(app, settings) -> None:
    """Start the thread (once per process)."""
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=_loop, args=(app, settings), daemon=True, name="hardnet-dispatcher").start()
    log.info("dispatcher on: keeps %d chunk message(s) in the queue, jobs served by priority and in turn",
             settings.dispatch_ahead)
