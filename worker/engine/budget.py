"""The byte budget of the engine: encoded bytes in flight across fetch and decode
(``HARDNET_BYTES_IN_FLIGHT``).

A body counts from the moment it is being read until its decode is done (or its image fails, or
its chunk is dropped). A fetcher reserves before it sends the GET (the listing's size when the
item carries one, else a running estimate of the object sizes seen), and sets its reservation to
the announced size once the response's headers are in, before it reads the body
(``Content-Length``, S3 ``ContentLength``, obstore's meta size, a file's ``stat``; an object of
unknown size reserves ``HARDNET_MAX_IMAGE_BYTES``); once the body is read the reservation becomes
its real length. Fetchers wait while the budget is spent, in arrival order, and are woken one by
one as bytes are given back (no polling of the budget).

Why it cannot deadlock: a waiter holds no bytes (one that must grow its reservation gives back
what it held first, and is served before new arrivals); every holder of bytes is either reading
a body or is on its way through decoding, neither of which waits on the budget; so bytes always
come back. And a reservation is granted whenever nothing else holds bytes, even if it is larger
than the whole budget: an object over the budget is labelled alone (an object over
``HARDNET_MAX_IMAGE_BYTES`` is ``too_large`` before anything is reserved).

The default: a quarter of the memory the process may use (the cgroup's ``memory.max`` /
``memory.limit_in_bytes``, ``HARDNET_MAX_MEMORY_PER_CHILD_MB``, physical RAM: the smallest), at
least :data:`MIN_DEFAULT` (64 MiB)."""
from __future__ import annotations

import os
import threading
from collections import deque

#: share of the process's memory the default budget takes
DEFAULT_FRACTION = 0.25
#: the default budget is never below this
MIN_DEFAULT = 64 * 2**20
#: how often a waiter looks whether its chunk was dropped meanwhile (it is woken at once by a grant)
_CANCEL_CHECK_S = 0.5

def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # cgroup v2 "max": no limit


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None when there is none."""
    paths = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                hid, ctrl, path = line.rstrip("\n").split(":", 2)
                if hid == "0" and ctrl == "":
                    paths.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.max")
                elif "memory" in ctrl.split(","):
                    paths.append(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    paths += ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    for p in paths:
        v = _read_int(p)
        if v is not None and 0 < v < 2**60:     # v1 says "no limit" with a huge number
            return v
    return None


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_bytes_in_flight(max_memory_mb: int | None = None) -> int:
    """:data:`DEFAULT_FRACTION` of the smallest of the cgroup limit, ``max_memory_mb``
    (HARDNET_MAX_MEMORY_PER_CHILD_MB) and physical RAM; at least :data:`MIN_DEFAULT`."""
    limits = [v for v in (cgroup_memory_limit(), physical_memory(),
                          max_memory_mb * 2**20 if max_memory_mb else None) if v]
    if not limits:
        return MIN_DEFAULT * 16
    return max(MIN_DEFAULT, int(min(limits) * DEFAULT_FRACTION))


class _Waiter:
    __slots__ = ("n", "cond", "granted", "first")

    def __init__(self, n: int, cond: threading.Condition, first: bool):
        self.n = n
        self.cond = cond
        self.granted = False
        self.first = first


class ByteBudget:
    """``limit`` bytes, reserved and given back by the engine's stages (see the module doc).

    ``reserve`` blocks; ``give_back`` never does. A reservation is granted, in arrival order,
    when it fits (``used + n <= limit``) or when nothing else is held (``used == 0``)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"byte budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits = 0          # reservations that had to wait
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()
        self._firsts = 0        # waiters at the head queued with first=True
        self._closed = False

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def _take(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def _grant(self) -> None:
        """Serve waiters from the head while they fit (with the lock held)."""
        while self._waiters and self._fits(self._waiters[0].n):
            w = self._waiters.popleft()
            if w.first:
                self._firsts -= 1
            self._take(w.n)
            w.granted = True
            w.cond.notify()

    def reserve(self, n: int, *, first: bool = False, cancelled=None) -> bool:
        """Take ``n`` bytes, waiting for them if need be. ``first``: served before the waiters
        already queued (a fetcher whose response is open). ``cancelled()``: looked at while
        waiting; when it says True the wait ends, nothing is held, and False is returned (also
        once the budget is closed)."""
        with self._lock:
            if self._closed:
                return False
            if not self._waiters and self._fits(n):
                self._take(n)
                return True
            w = _Waiter(n, threading.Condition(self._lock), first)
            if first:       # after the other ``first`` waiters, before everyone else
                self._waiters.insert(self._firsts, w)
                self._firsts += 1
            else:
                self._waiters.append(w)
            self.waits += 1
            self._grant()          # a new head (``first``) may fit at once
            while not w.granted:
                if self._closed or (cancelled is not None and cancelled()):
                    self._waiters.remove(w)
                    if w.first:
                        self._firsts -= 1
                    self._grant()  # it may have been the head that held the others back
                    return False
                w.cond.wait(_CANCEL_CHECK_S if cancelled is not None else None)
            return True

    def give_back(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.used -= n
            if self._waiters:
                self._grant()

    def force(self, n: int) -> None:
        """Count ``n`` more bytes without waiting (bytes already in memory)."""
        if n > 0:
            with self._lock:
                self._take(n)

    def set_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"byte budget must be at least 1 byte, got {limit}")
        with self._lock:
            self.limit = limit
            self._grant()

    def waiting(self) -> int:
        return len(self._waiters)

    def close(self) -> None:
        """Wake every waiter (their ``reserve`` returns False) and refuse new reservations."""
        with self._lock:
            self._closed = True
            for w in self._waiters:
                w.cond.notify()

    def snapshot(self) -> dict:
        return {"limit": self.limit, "used": self.used, "peak": self.peak, "waits": self.waits,
                "waiting": len(self._waiters)}


_process_budget: ByteBudget | None = None
_process_lock = threading.Lock()


def process_budget(limit: int) -> ByteBudget:
    """The one budget of this process, shared by all its engines (a worker keeps one per model it
    serves: HARDNET_MAX_ENGINES); a later call with another limit sets the new limit."""
    global _process_budget
    with _process_lock:
        if _process_budget is None:
            _process_budget = ByteBudget(limit)
        elif _process_budget.limit != limit:
            _process_budget.set_limit(limit)
        return _process_budget
