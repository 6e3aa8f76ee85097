"""The engines of one worker process: one per (model, weights), built on first use, at most
``HARDNET_MAX_ENGINES`` at once.

A job names its model (`submit --model`) and may name a checkpoint (`submit --weights`); every
chunk in flight that asks for the same pair shares one engine, whose batches mix their images.
A new pair is loaded lazily, by the first chunk that needs it (the others asking for it wait for
that load, not for a second one). When the pool is full, the least recently used engine that no
chunk is using is closed (its threads stopped, its model freed) to make room; if every engine is
in use, the chunk waits until one is free. A chunk therefore never fails for want of an engine, and
a worker never holds more than the bound, whatever mix of jobs the queue brings.

Which weights a message may name is the worker's decision, as for destinations: 'official' and
'random' always; the worker's own ``HARDNET_WEIGHTS``; otherwise only a path or URL under one of
``HARDNET_JOB_WEIGHTS_ALLOW`` (directories and URL prefixes). Anything else fails the chunk as a
configuration error (dead letter, no retry) saying which setting to change.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

from hnq.fleet import check_job_weights  # noqa: F401 - the one rule, also read by the check at submit
from hnq.models import OFFICIAL, RANDOM, weights_key

log = logging.getLogger("hardnet.worker")


def resolve_job_weights(model: str, job_weights: str | None, worker_model: str,
                        worker_weights: str | None) -> str | None:
    """The weights a chunk is labelled with. A job without --weights gets the worker's own
    choice: HARDNET_WEIGHTS names a checkpoint of the worker's model; other variants get their
    official weights, except that "random" (tests, demos) applies to all. Spellings are read
    with the one rule, hnq.models.weights_key (which also keys this pool's engines)."""
    if job_weights is not None:
        return None if weights_key(job_weights) == OFFICIAL else job_weights
    if model == worker_model or (worker_weights is not None and weights_key(worker_weights) == RANDOM):
        return worker_weights
    return None


class _Entry:
    __slots__ = ("key", "engine", "users", "error", "last_used")

    def __init__(self, key):
        self.key = key
        self.engine = None        # None while being built
        self.users = 0
        self.error: BaseException | None = None
        self.last_used = time.monotonic()


class EnginePool:
    """``build(model, weights) -> engine`` makes one (slow: loads the model); ``close(engine)``
    frees one. Thread-safe; used by every chunk thread of the worker."""

    def __init__(self, build: Callable, max_engines: int, close: Callable | None = None):
        if max_engines < 1:
            raise ValueError("max_engines must be at least 1")
        self._build = build
        self._close = close or (lambda e: e.close())
        self.max_engines = max_engines
        self._entries: OrderedDict = OrderedDict()   # least recently used first
        self._cond = threading.Condition()
        self.evictions = 0

    def live(self) -> list:
        """The engines loaded now (scrape-time metrics read their in-flight counts)."""
        with self._cond:
            return [e.engine for e in self._entries.values() if e.engine is not None]

    def keys(self) -> list[tuple[str, str]]:
        with self._cond:
            return [k for k, e in self._entries.items() if e.engine is not None]

    @contextmanager
    def lease(self, model: str, weights: str | None) -> Iterator:
        """The engine for (model, weights), held for the duration of the block."""
        entry = self._acquire(model, weights)
        try:
            yield entry.engine
        finally:
            with self._cond:
                entry.users -= 1
                entry.last_used = time.monotonic()
                self._cond.notify_all()

    def get(self, model: str, weights: str | None):
        """The engine without holding it (start-up preload, logging): it may be evicted later."""
        with self.lease(model, weights) as eng:
            return eng

    def _acquire(self, model: str, weights: str | None) -> _Entry:
        key = (model, weights_key(weights))
        while True:
            to_close = None
            with self._cond:
                e = self._entries.get(key)
                if e is not None:
                    if e.engine is not None:
                        e.users += 1
                        self._entries.move_to_end(key)
                        return e
                    self._cond.wait(1.0)          # being built by another chunk
                    if e.error is not None and self._entries.get(key) is None:
                        raise e.error
                    continue
                if len(self._entries) >= self.max_engines:
                    idle = [x for x in self._entries.values() if x.engine is not None and x.users == 0]
                    if not idle:
                        self._cond.wait(1.0)      # every engine in use: wait for one to be free
                        continue
                    victim = min(idle, key=lambda x: x.last_used)
                    del self._entries[victim.key]
                    self.evictions += 1
                    to_close = victim
                else:
                    e = _Entry(key)
                    self._entries[key] = e
            if to_close is not None:
                log.info("engine for %s weights=%s closed to make room (HARDNET_MAX_ENGINES=%d)",
                         to_close.key[0], to_close.key[1], self.max_engines)
                try:
                    self._close(to_close.engine)
                except Exception as ex:  # noqa: BLE001 - a failed close must not stop the worker
                    log.warning("closing the engine for %s failed: %s", to_close.key, ex)
                continue
            # We own the new entry: build it outside the lock (slow).
            try:
                eng = self._build(model, weights)
            except BaseException as ex:
                with self._cond:
                    e.error = ex
                    self._entries.pop(key, None)
                    self._cond.notify_all()
                raise
            with self._cond:
                e.engine = eng
                e.users += 1
                self._cond.notify_all()
            return e

    def close_all(self) -> None:
        with self._cond:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            if e.engine is not None:
                self._close(e.engine)
