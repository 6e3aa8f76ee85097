"""Fetch stage: many downloads in flight (threads: boto3, obstore and the file backend all block,
and release the GIL while they wait), in completion order, with per-image retries.

An image whose fetch fails transiently (503 SlowDown, resets, timeouts) is not the chunk's
problem: it goes back into this stage's queue after a backoff and is fetched again, within a
per-image attempt budget and deadline; when those are spent it gets its own record with the
error's code (``throttled``, ``timeout``, ``fetch_error``). Its chunk decides whether that many
such failures mean that storage itself is down (see :meth:`Chunk.transient_failure`).

Every body is counted against the engine's byte budget (:mod:`worker.engine.budget`,
``HARDNET_BYTES_IN_FLIGHT``) from before its GET until its decode is done: :meth:`FetchStage.admit`
reserves, the backend's ``on_size`` sets the reservation to the announced size before the body is
read, and :meth:`FetchStage.release` gives it back (decoded, failed or dropped)."""
from __future__ import annotations

import heapq
import inspect
import itertools
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable

from hnq.errors import ErrorCode, ImageError, TransientError
from hnq.storage import Fetched
from worker.engine.budget import ByteBudget
from worker.engine.stats import StageStats


@dataclass(frozen=True)
class RetryPolicy:
    """Per-image retries of transient fetch failures inside the engine."""

    attempts: int = 4           # fetches of one image in all, the first included
    deadline_s: float = 120.0   # from its first try: no new attempt would start after this
    backoff_s: float = 0.5      # first wait; doubles each time (with jitter), up to backoff_max_s
    backoff_max_s: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt + 1`` (attempt >= 1 failed)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class WorkQueue:
    """FIFO of items to fetch now, plus a heap of items due again later (retries). ``get`` hands
    out due retries first (they are the oldest work), then new items."""

    def __init__(self):
        self._cv = threading.Condition()
        self._now: deque = deque()
        self._later: list = []
        self._seq = itertools.count()
        self._closed = False

    def put_many(self, items) -> None:
        with self._cv:
            before = len(self._now)
            self._now.extend(items)
            self._cv.notify(len(self._now) - before)

    def put_later(self, item, due: float) -> None:
        with self._cv:
            heapq.heappush(self._later, (due, next(self._seq), item))
            self._cv.notify()

    def get(self):
        """The next item, or None once closed."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                if self._later and self._later[0][0] <= now:
                    return heapq.heappop(self._later)[2]
                if self._now:
                    return self._now.popleft()
                timeout = self._later[0][0] - now if self._later else None
                self._cv.wait(timeout)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._now) + len(self._later)

    def ready(self) -> int:
        """Items to fetch now, read without the lock (a hint)."""
        return len(self._now)


#: fetch threads a stage starts with; it adds more, up to its maximum, as the store's latency
#: asks for them (FetchStage._grow)
FIRST_THREADS = 8
#: what an admission reserves before anything is known of the object's size, until the stage has
#: seen sizes (then: a running mean of them)
FIRST_ESTIMATE = 1 << 20


def takes_on_size(fetch: Callable) -> bool:
    """Whether ``fetch`` accepts ``on_size=`` (hnq.storage.fetch does; a test's stand-in may not:
    then the size is counted once the body is in)."""
    try:
        params = inspect.signature(fetch).parameters
    except (TypeError, ValueError):
        return False
    return "on_size" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class FetchStage:
    """Up to ``threads`` fetchers. Each takes an item, calls ``fetch(uri)`` and hands the result
    to ``on_fetched(item, fetched)`` (which may block: that is the back-pressure from decoding),
    or ``on_failed(item, error, transient)`` when the image gets an error record.

    It starts :data:`FIRST_THREADS` fetchers and adds one when a fetcher is about to fetch while
    every other fetcher is inside a fetch, more items are ready, and ``has_room()`` says the next
    stage could take more (its queue is below half): waiting on the store is then what holds the
    pipeline back. Against a distant store it grows to the maximum within about one round trip,
    since every fetch that starts can add a fetcher. Against a store that answers at once the
    fetchers are rarely all inside a fetch and it stays small: there, 256 runnable fetchers mostly
    hand the GIL to each other, costing CPU and context switches per image (figures,
    ``bench_engine.py ceiling``: docs/performance.md#the-engines-own-ceiling-bench_enginepy-ceiling-2026-12-06-later).
    Threads are never stopped: a worker's store does not change.

    ``budget``: the engine's :class:`~worker.engine.budget.ByteBudget`; ``unknown_size``: what an
    object whose size is not announced reserves (the download cap). No fetcher is added while
    fetchers wait for bytes."""

    def __init__(self, fetch: Callable[..., Fetched], threads: int, retry: RetryPolicy,
                 on_fetched: Callable, on_failed: Callable, *, has_room: Callable[[], bool] = lambda: True,
                 first_threads: int = FIRST_THREADS, budget: ByteBudget | None = None,
                 unknown_size: int = 50 * 2**20):
        self.fetch = fetch
        self.budget = budget if budget is not None else ByteBudget(2**62)
        self.unknown_size = unknown_size
        self._sized_fetch = takes_on_size(fetch)
        #: reserved at admission when the item carries no size: the mean of recent sizes
        self.estimate = float(FIRST_ESTIMATE)
        self.retry = retry
        self.on_fetched = on_fetched
        self.on_failed = on_failed
        self.has_room = has_room
        self.max_threads = threads
        self.queue = WorkQueue()
        self.stats = StageStats("fetch", threads)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: one flag per fetcher, written only by that fetcher: inside ``fetch`` now
        self._fetching: list[bool] = []
        self._closed = False
        with self._lock:
            for _ in range(min(threads, max(1, first_threads))):
                self._spawn()

    @property
    def threads(self) -> int:
        """Fetchers started so far."""
        return len(self._threads)

    def _spawn(self) -> None:
        """One more fetcher (with the lock held)."""
        i = len(self._threads)
        self._fetching.append(False)
        t = threading.Thread(target=self._run, args=(i,), name=f"hnq-fetch-{i}", daemon=True)
        self._threads.append(t)
        t.start()

    def _grow(self) -> None:
        # Cheap unlocked reads first: this runs before every fetch and almost always adds nothing.
        n = len(self._threads)
        if n >= self.max_threads or not self.queue.ready() or not self.has_room() or self.budget.waiting():
            return
        if sum(self._fetching) < n:     # some fetcher is not waiting on the store
            return
        with self._lock:
            if not self._closed and len(self._threads) < self.max_threads:
                self._spawn()

    def submit(self, items) -> None:
        self.queue.put_many(items)

    def _run(self, i: int) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if item.chunk.closed or not self.admit(item):
                item.chunk.skip(item)
                continue
            # flagged before _grow, so that the fetcher it adds sees this one fetching and can add
            # the next one at once (while the store is slow, the stage grows within a round trip)
            self._fetching[i] = True
            self._grow()
            t0 = time.monotonic()
            if item.attempts == 0:
                item.first_try = t0
            item.attempts += 1
            try:
                if self._sized_fetch:
                    got = self.fetch(item.uri, on_size=partial(self._sized, item, i))
                else:
                    got = self.fetch(item.uri)
            except TransientError as e:
                self._fetching[i] = False
                self.release(item)          # nothing is held while it waits for its retry
                self.stats.add(time.monotonic() - t0, errors=1)
                self._transient(item, e)
                continue
            except Exception as e:  # noqa: BLE001 - an ImageError, or a bug: that image's record
                self._fetching[i] = False
                self.release(item)
                self.stats.add(time.monotonic() - t0, errors=1)
                self.on_failed(item, e, False)
                continue
            self._fetching[i] = False
            self._settle(item, len(got.data))
            self.stats.add(time.monotonic() - t0)
            self.on_fetched(item, got)
            # not kept alive while this fetcher waits for its next item: once decoded, the body
            # must be freed, not held by this frame beyond the budget (8 fetchers x 30 MB, seen)
            got = None

    # -- the byte budget --
    def admit(self, item) -> bool:
        """Reserve for ``item`` before its GET: the listing's size when it has one, else the
        running estimate (never more than the whole budget). False when its chunk was dropped while it waited (nothing held)."""
        n = item.hint if item.hint else max(1, min(int(self.estimate), self.budget.limit))
        chunk = item.chunk
        if not self.budget.reserve(n, cancelled=lambda: chunk.closed):
            return False
        item.held = n
        return True

    def _sized(self, item, i: int, n: int | None) -> None:
        """The backend's ``on_size``: the body about to be read is ``n`` bytes (None: unknown,
        the download cap is reserved). Grows the reservation (waiting, holding nothing
        meanwhile) or gives back what is not needed."""
        if n is None:
            n = self.unknown_size
        held = item.held
        if n <= held:
            if n < held:
                item.held = n
                self.budget.give_back(held - n)
            return
        item.held = 0
        self.budget.give_back(held)
        self._fetching[i] = False       # waiting on the budget, not on the store
        chunk = item.chunk
        try:
            ok = self.budget.reserve(n, first=True, cancelled=lambda: chunk.closed)
        finally:
            self._fetching[i] = True
        if not ok:
            raise ImageError(f"{item.uri}: not read: its chunk was dropped while the object waited "
                             "for room in HARDNET_BYTES_IN_FLIGHT", ErrorCode.cancelled)
        item.held = n

    def _settle(self, item, n: int) -> None:
        """The body is in: its reservation becomes its length."""
        held = item.held
        if n != held:
            item.held = n
            if n < held:
                self.budget.give_back(held - n)
            else:
                self.budget.force(n - held)
        self.estimate += (n - self.estimate) * 0.125

    def release(self, item) -> None:
        """Give back what ``item`` holds (decoded, failed or dropped); idempotent."""
        held = item.held
        if held:
            item.held = 0
            self.budget.give_back(held)

    def _transient(self, item, e: TransientError) -> None:
        now = time.monotonic()
        wait = self.retry.delay(item.attempts)
        if item.attempts < self.retry.attempts and now + wait - item.first_try < self.retry.deadline_s:
            self.stats.retry()
            self.queue.put_later(item, now + wait)
            return
        spent = now - item.first_try
        e = TransientError(f"{e} (gave up after {item.attempts} attempts in {spent:.1f}s)", e.code)
        self.on_failed(item, e, True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.queue.close()
        # the budget may be shared with other engines: not closed here; a fetcher waiting for
        # bytes leaves once its chunk is failed (Engine.close fails them all)
