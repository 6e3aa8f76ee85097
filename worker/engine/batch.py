"""The batcher: decoded images from every chunk in flight, in the order they became ready, cut
into batches for the device (a dynamic batcher, as Triton's).

A batch is cut when ``size`` images are ready; or, with fewer, when the oldest has waited
``max_wait_s``, or at once when nothing more is on its way (no image of any chunk is still being
fetched or decoded) — so the device never waits for a batch that cannot fill, and the tail of
the last chunk is not held back. The buffer is bounded: decoders block when it is full."""
from __future__ import annotations

import threading
import time
from collections import deque


class Batcher:
    def __init__(self, size: int, max_wait_s: float, capacity: int):
        self.size = size
        self.max_wait_s = max_wait_s
        self.capacity = max(capacity, size)
        lock = threading.Lock()
        self._cv = threading.Condition(lock)          # the device thread waits here
        self._room = threading.Condition(lock)        # decoders wait here when the buffer is full
        self._ready: deque = deque()       # (time it became ready, item)
        self._upstream = 0                 # images admitted and not yet ready nor finished
        self._closed = False

    # -- the engine's bookkeeping of what is on its way --
    def expect(self, n: int) -> None:
        with self._cv:
            self._upstream += n

    def forget(self, n: int = 1) -> None:
        """``n`` admitted images will never become ready (failed, skipped)."""
        with self._cv:
            self._upstream -= n
            if self._upstream <= 0:
                self._cv.notify()

    def put(self, item) -> bool:
        with self._cv:
            while len(self._ready) >= self.capacity and not self._closed:
                self._room.wait()
            if self._closed:
                return False
            self._ready.append((time.monotonic(), item))
            self._upstream -= 1
            if len(self._ready) >= self.size or self._upstream <= 0 or len(self._ready) == 1:
                self._cv.notify()      # a batch can be cut, or the first item starts the clock
            return True

    def take(self, block: bool = True) -> list | None:
        """The next batch; [] when ``block`` is False and nothing is ready; None once closed."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                n = len(self._ready)
                if n >= self.size or (n and self._upstream <= 0):
                    return self._cut()
                if n:
                    wait = self._ready[0][0] + self.max_wait_s - time.monotonic()
                    if wait <= 0:
                        return self._cut()
                    if not block:
                        return []
                    self._cv.wait(wait)
                elif not block:
                    return []
                else:
                    self._cv.wait()

    def _cut(self) -> list:
        out = [self._ready.popleft()[1] for _ in range(min(self.size, len(self._ready)))]
        self._room.notify(len(out))
        return out

    def depth(self) -> tuple[int, int]:
        with self._cv:
            return len(self._ready), self._upstream

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            self._room.notify_all()
