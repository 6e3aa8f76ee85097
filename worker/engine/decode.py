"""Decode stage: encoded bytes -> uint8 [3,224,224], on as many threads as this process may use
(torchvision's and PIL's decoders release the GIL: 2 threads ran 1.85x one here).

Its input is bounded in items and in bytes: when decoding falls behind, fetchers block on
``put`` instead of piling up downloads in memory (back-pressure, no unbounded buffer). Each body
holds its share of the engine's byte budget (:mod:`worker.engine.budget`) until it is decoded:
``release(item)`` gives it back then, before the image goes on to the batcher."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from worker.engine.stats import StageStats


class BoundedQueue:
    """FIFO bounded by item count and by the sum of the items' sizes (an item larger than the
    byte bound alone still passes when the queue is empty, so nothing can wedge it).

    Producers and consumers are notified only when one of them waits (a notify per item was a
    large share of the stage threads' GIL-held samples with a zero-cost model, py-spy --gil:
    docs/performance.md#against-its-limits-benchmarksbench_enginepy).
    Blocked producers are woken one per item taken, not in a burst once the queue has drained to
    half (hysteresis): measured both ways (``bench_engine.py`` ``plumbing`` and ``ceiling``),
    hysteresis saved context switches where decoding is the limit at the same images/s, but cost
    the engine's own ceiling images/s (figures:
    docs/performance.md#the-decode-queues-wake-up-rule-2026-12-06-third-session)."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._low_items = max_items // 2
        self._low_bytes = max_bytes // 2
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)
        self._q: deque = deque()
        self._bytes = 0
        self._closed = False
        self._getters = 0     # threads waiting in get / get_many
        self._putters = 0     # threads waiting in put

    def _full_for(self, nbytes: int) -> bool:
        return bool(self._q) and (len(self._q) >= self.max_items or self._bytes + nbytes > self.max_bytes)

    def put(self, item, nbytes: int) -> bool:
        with self._not_full:
            while not self._closed and self._full_for(nbytes):
                self._putters += 1
                self._not_full.wait()
                self._putters -= 1
            if self._closed:
                return False
            self._q.append((item, nbytes))
            self._bytes += nbytes
            if self._getters:
                self._not_empty.notify()
            return True

    def _pop(self):
        item, nbytes = self._q.popleft()
        self._bytes -= nbytes
        return item

    def _room_made(self, n: int = 1) -> None:
        """After taking ``n`` items: wake as many blocked producers (each holds one fetched item)."""
        if self._putters:
            self._not_full.notify(n)

    def _wait_for_items(self) -> None:
        while not self._q and not self._closed:
            self._getters += 1
            self._not_empty.wait()
            self._getters -= 1

    def get(self):
        with self._not_empty:
            self._wait_for_items()
            if not self._q:
                return None
            item = self._pop()
            self._room_made()
            return item

    def get_many(self, n: int) -> list:
        """At least one item (blocking), at most ``n``; [] once closed and empty."""
        with self._not_empty:
            self._wait_for_items()
            out = []
            while self._q and len(out) < n:
                out.append(self._pop())
            self._room_made(len(out))
            return out

    def close(self) -> None:
        with self._not_empty:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def depth(self) -> tuple[int, int]:
        with self._not_empty:
            return len(self._q), self._bytes

    def below_half(self) -> bool:
        """Below half its bounds (items and bytes); read without the lock, as a hint."""
        return len(self._q) < self._low_items and self._bytes < self._low_bytes


class DecodeStage:
    """``threads`` decoders calling ``decode(bytes) -> tensor`` and handing the image to
    ``on_decoded(item)`` (which may block: the batcher's bound) or ``on_failed(item, error)``.

    With ``batch_decode`` (GPU decoding) one more thread takes up to ``batch`` items at a time
    and calls ``batch_decode(list of bytes) -> list of tensor | Exception``; only the blobs that
    ``eligible(bytes)`` accepts (baseline JPEGs) go that way, the rest (progressive, CMYK, PNG...)
    to the CPU threads, so that fallbacks are decoded in parallel too."""

    def __init__(self, decode: Callable, threads: int, on_decoded: Callable, on_failed: Callable,
                 *, max_items: int, max_bytes: int, batch_decode: Callable | None = None,
                 eligible: Callable[[bytes], bool] | None = None, batch: int = 64,
                 release: Callable = lambda item: None):
        self.decode = decode
        self.release = release
        self.batch_decode = batch_decode
        self.eligible = eligible or (lambda data: True)
        self.batch = batch
        self.on_decoded = on_decoded
        self.on_failed = on_failed
        self.queue = BoundedQueue(max_items, max_bytes)
        self.gpu_queue = BoundedQueue(max_items, max_bytes) if batch_decode is not None else None
        self.stats = StageStats("decode", threads + (1 if batch_decode is not None else 0))
        #: called with the seconds of each GPU decode batch (stats.observer gets CPU images only)
        self.batch_observer = None
        self._threads = [threading.Thread(target=self._run, name=f"hnq-decode-{i}", daemon=True)
                         for i in range(threads)]
        if batch_decode is not None:
            self._threads.append(threading.Thread(target=self._run_batched, name="hnq-decode-gpu",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def put(self, item) -> bool:
        n = len(item.data) if item.data is not None else 0
        if self.gpu_queue is not None and n and self.eligible(item.data):
            return self.gpu_queue.put(item, n)
        return self.queue.put(item, n)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if item.chunk.closed:
                item.chunk.skip(item)
                continue
            data, item.data = item.data, None
            t0 = time.monotonic()
            try:
                item.image = self.decode(data)
            except Exception as e:  # noqa: BLE001 - ImageError (coded) or a bug: that image's record
                data = None
                self.release(item)
                self.stats.add(time.monotonic() - t0, errors=1)
                self.on_failed(item, e, False)
                continue
            data = None     # not kept alive while this thread waits for the next item
            self.release(item)
            self.stats.add(time.monotonic() - t0)
            self.on_decoded(item)

    def _run_batched(self) -> None:
        while True:
            items = self.gpu_queue.get_many(self.batch)
            if not items:
                return
            live = []
            for it in items:
                if it.chunk.closed:
                    it.chunk.skip(it)
                else:
                    live.append(it)
            if not live:
                continue
            blobs = [it.data for it in live]
            for it in live:
                it.data = None
            t0 = time.monotonic()
            try:
                results = self.batch_decode(blobs)
            except Exception as e:  # noqa: BLE001 - the decoder itself broke: every image's record
                results = [e] * len(live)
            blobs = None
            for it in live:
                self.release(it)
            errors = sum(isinstance(r, Exception) for r in results)
            dt = time.monotonic() - t0
            self.stats.add(dt, items=len(live), errors=errors, observe=False)
            if self.batch_observer is not None:
                self.batch_observer(dt)
            for it, r in zip(live, results):
                if isinstance(r, Exception):
                    self.on_failed(it, r, False)
                else:
                    it.image = r
                    self.on_decoded(it)

    def has_room(self) -> bool:
        """Could decoding take images faster than they come (its queues below half)? The fetch
        stage adds fetchers only then."""
        return self.queue.below_half() and (self.gpu_queue is None or self.gpu_queue.below_half())

    def depth(self) -> tuple[int, int]:
        n, b = self.queue.depth()
        if self.gpu_queue is not None:
            gn, gb = self.gpu_queue.depth()
            n, b = n + gn, b + gb
        return n, b

    def close(self) -> None:
        self.queue.close()
        if self.gpu_queue is not None:
            self.gpu_queue.close()
