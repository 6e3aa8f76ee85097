"""Per-stage statistics of the engine: enough to find the bottleneck (which stage is busy, which
waits) without a profiler. Cheap: one lock and a few additions per item.

Each object also takes an optional ``observer``, called outside the lock with what was added: the
worker points it at its Prometheus histograms (worker.metrics.instrument), so that the engine itself
knows nothing about Prometheus and `hardnet classify` pays nothing for it."""
from __future__ import annotations

import threading
import time


class StageStats:
    """Counts, busy time and errors of one stage. ``busy_s`` sums the time spent in the stage's
    work (over all its threads), so busy_s / wall / threads is its utilisation."""

    def __init__(self, name: str, threads: int = 1):
        self.name = name
        self.threads = threads
        self._lock = threading.Lock()
        self.items = 0
        self.errors = 0
        self.retries = 0
        self.busy_s = 0.0
        #: called with the seconds of each ``add`` (one fetch attempt, one image's decode)
        self.observer = None

    def add(self, seconds: float, items: int = 1, errors: int = 0, *, observe: bool = True) -> None:
        """``observe=False``: counted here but not passed to the observer (a GPU decode batch, whose
        time is not one image's: DecodeStage reports it apart)."""
        with self._lock:
            self.items += items
            self.errors += errors
            self.busy_s += seconds
        if observe and self.observer is not None:
            self.observer(seconds)

    def retry(self) -> None:
        with self._lock:
            self.retries += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"items": self.items, "errors": self.errors, "retries": self.retries,
                    "busy_s": round(self.busy_s, 3), "threads": self.threads}


class BatchStats:
    """Batch sizes (a histogram in powers of two) and the device's busy time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batches = 0
        self.images = 0
        self.largest = 0
        self.busy_s = 0.0
        self.hist: dict[int, int] = {}
        #: called with (images in the batch, device seconds) of each batch
        self.observer = None

    def add(self, n: int, seconds: float) -> None:
        bucket = 1 << max(0, (n - 1).bit_length())
        with self._lock:
            self.batches += 1
            self.images += n
            self.largest = max(self.largest, n)
            self.busy_s += seconds
            self.hist[bucket] = self.hist.get(bucket, 0) + 1
        if self.observer is not None:
            self.observer(n, seconds)

    def snapshot(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "images": self.images, "largest": self.largest,
                    "mean": round(self.images / self.batches, 1) if self.batches else 0.0,
                    "busy_s": round(self.busy_s, 3),
                    "hist": {f"<={k}": v for k, v in sorted(self.hist.items())}}


class Clock:
    """Wall time since the engine started, for utilisation figures."""

    def __init__(self):
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0
