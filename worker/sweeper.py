"""The workers' periodic sweep for lost chunks (hnq.jobs.sweep): a daemon thread in each worker process;
a Redis lock lets one worker at a time do a pass. Workers keep their long broker backoff: a sweep
that fails (Redis restarting) is logged and tried again next interval."""
from __future__ import annotations

import logging
import random
import socket
import threading
import time

from celery import signals

from hnq.jobs.liveness import abandon_zombies
from hnq.jobs.store import JobStore
from hnq.jobs.sweep import LOCK_KEY, sweep
from worker.app import settings

log = logging.getLogger("hardnet.sweep")
_started = threading.Event()


def _loop(interval: int) -> None:
    store = JobStore.from_settings(settings)
    me = f"{socket.gethostname()}:{threading.get_native_id()}"
    while True:
        time.sleep(interval * random.uniform(0.8, 1.2))
        try:
            if store.r.set(LOCK_KEY, me, nx=True, ex=max(2, int(interval * 0.8))):
                abandon_zombies(store)     # unsealed jobs whose submit is gone (hnq.jobs.liveness)
                sent = sweep(store, settings.visibility_timeout)
                if sent:
                    log.warning("sweep re-sent stalled chunks: %s", {j: len(c) for j, c in sent.items()})
        except Exception as e:  # noqa: BLE001 - never let the sweeper die
            log.warning("sweep failed (will try again): %s", e)


@signals.worker_ready.connect
def _start_sweeper(**_):
    interval = settings.sweep_interval
    if interval <= 0 or _started.is_set():
        return
    _started.set()
    threading.Thread(target=_loop, args=(interval,), daemon=True, name="hardnet-sweeper").start()
    log.info("sweeper on: every %ds, chunks quiet for more than %ds are re-sent", interval,
             settings.visibility_timeout)
