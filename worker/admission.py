"""How many chunk messages a worker holds at once: sized in images, not only in chunks.

The engine keeps the device busy only when enough images are in flight: those being fetched (the
store's latency x the device's rate), decoded, and a few batches ready (Little's law). A fixed
number of chunks gives that with the default chunk size, but not with small chunks: 4 chunks of 16
are 64 images, less than two CPU batches, and the device waited for every chunk's turnover
(figures, in-process and through the queue with benchmarks/bench_engine.py latency39:
docs/performance.md#against-its-limits-benchmarksbench_enginepy, "Chunks admitted by images").

So a worker always takes ``HARDNET_CHUNKS_IN_FLIGHT`` chunks, and keeps taking more, up to
``HARDNET_MAX_CHUNKS_IN_FLIGHT`` (its threads pool), while the chunks it holds have fewer than
``HARDNET_IMAGES_IN_FLIGHT`` images (0 = 8 batches of the device's batch size: 256 on the CPU,
2,048 on a GPU). With the default chunk size (512) that is the same 4 chunks as before.

How: kombu's Redis channel asks its QoS ``can_consume()`` before every BRPOP; our channel's QoS
(worker/transport.py) also asks :meth:`Admission.wants_more`. The chunks held are Celery's own
record of reserved requests (received and not yet finished), whose messages carry their image count;
Celery marks a request finished before it acknowledges the message, and the acknowledgement wakes
the consumer loop, which then asks again.
"""
from __future__ import annotations

import logging
import threading

from celery.worker import state

from hnq.settings import TASK_CLASSIFY

log = logging.getLogger("hardnet.worker")

#: the default of HARDNET_IMAGES_IN_FLIGHT, in batches of the worker's device
BATCHES_IN_FLIGHT = 8


class Admission:
    """``min_chunks`` always; more up to ``max_chunks`` while the held chunks have fewer than
    ``images`` images. ``images`` 0 = not known yet (no engine built): ``min_chunks`` only."""

    def __init__(self, min_chunks: int, max_chunks: int, images: int = 0):
        self.min_chunks = min_chunks
        self.max_chunks = max(min_chunks, max_chunks)
        self.images = images
        self._warned = False
        self._lock = threading.Lock()

    def configure(self, images: int) -> None:
        self.images = images

    def wants_more(self, held: list[int | None]) -> bool:
        """``held``: the image count of each chunk held (None: not known, counted as a whole
        ``images``, so an unreadable message never makes the worker take more)."""
        n = len(held)
        if n < self.min_chunks:
            return True
        if n >= self.max_chunks or not self.images:
            return False
        return sum(self.images if c is None else c for c in held) < self.images

    def __call__(self) -> bool:
        """The gate for kombu's QoS: never raises (a broken gate must not stop the consumer
        loop; it falls back to the prefetch limit, i.e. ``max_chunks``)."""
        try:
            return self.wants_more(held_chunk_sizes())
        except Exception:  # noqa: BLE001
            with self._lock:
                if not self._warned:
                    self._warned = True
                    log.exception("chunk admission check failed; taking chunks up to the pool size")
            return True


def chunk_size_of(request) -> int | None:
    """The image count a reserved classify request's message declares (v2+ messages carry it);
    0 for other tasks (finalize, sweep: no images)."""
    if getattr(request, "name", None) != TASK_CLASSIFY:
        return 0
    args = getattr(request, "args", None) or ()
    payload = args[0] if args else None
    count = payload.get("count") if isinstance(payload, dict) else None
    return count if isinstance(count, int) and count >= 0 else None


def held_chunk_sizes() -> list[int | None]:
    """Image counts of the requests this worker has received and not finished (Celery's state;
    its WeakSet may change under us from a pool thread: take the snapshot again then)."""
    for _ in range(5):
        try:
            reqs = list(state.reserved_requests)
            break
        except RuntimeError:   # "Set changed size during iteration"
            continue
    else:
        reqs = []
    return [chunk_size_of(r) for r in reqs]
