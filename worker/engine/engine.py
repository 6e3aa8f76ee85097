"""The streaming engine: one per worker process and model, fed by every chunk in flight.

    fetch (threads, hundreds in flight, per-image retries)
      -> decode (all allowed cores; or batched nvJPEG on the GPU)   bounded in items and bytes
      -> batcher (full batches across chunks, completion order)     bounded
      -> device (pinned, side-stream copies, fp16/channels_last, top-k on the device; two batches in flight)
      -> records, put in place in their chunk; a chunk is done when its last image is.

Each Celery task calls :meth:`Engine.submit` with its URIs and waits on the :class:`Chunk` it gets
back; the task writes the part and acknowledges the message. A slow object holds back nothing but
its own chunk; records still come out in the chunk's order (each has its slot).

The stages are plain threads joined by bounded queues (see docs/performance.md, "Engine", for why
not SPDL or torchdata.nodes: this is a long-lived service fed by many callers, whose batches must
also be cut on idleness, and whose items come back for retries)."""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from hnq.errors import ErrorCode, HardnetError, ImageError, TransientError
from hnq.schema import ResultRecord
from worker.engine.batch import Batcher
from worker.engine.budget import ByteBudget, default_bytes_in_flight
from worker.engine.decode import DecodeStage
from worker.engine.device import DeviceRunner, top_labels
from worker.engine.fetch import FIRST_THREADS, FetchStage, RetryPolicy
from worker.engine.stats import BatchStats, Clock, StageStats
from worker.model.labels import IMAGENET_CATEGORIES

log = logging.getLogger("hardnet.worker")


class StorageDown(TransientError):
    """Most of a chunk's images failed transiently: storage itself is in trouble, not those
    images. The chunk is retried as a whole later instead of recording them as failures."""


class ChunkCancelled(HardnetError):
    code = ErrorCode.cancelled


@dataclass(frozen=True)
class EngineConfig:
    batch_size: int
    #: most fetch threads; the stage starts first_fetch_threads and adds more as the store's
    #: latency asks for them (worker.engine.fetch.FetchStage)
    fetch_threads: int = 64
    first_fetch_threads: int = FIRST_THREADS
    decode_threads: int = 2
    #: how long a short batch may wait for more images while more are on their way
    batch_wait_s: float = 0.01
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: bounds of the decode stage's input (fetched, not yet decoded); 0 items = 2 batches (at
    #: least 64). Tight on purpose: fetchers that run far ahead of decoding only churn the GIL
    #: (measured with a zero-cost model on 2 cores: 530 img/s at 512, 740-810 at 64, decode-only 790)
    max_fetched_items: int = 0
    max_fetched_bytes: int = 256 * 2**20
    #: encoded bytes in flight across fetch and decode (HARDNET_BYTES_IN_FLIGHT; see
    #: worker.engine.budget); 0 = sized from the memory the process may use
    bytes_in_flight: int = 0
    #: what an object whose size is not announced reserves (HARDNET_MAX_IMAGE_BYTES: it cannot
    #: be longer)
    unknown_size_bytes: int = 50 * 2**20
    #: a ByteBudget shared with other engines (build_engine: the process's one); None = a budget
    #: of its own of bytes_in_flight
    budget: object = None
    #: bound of decoded images waiting for the device, in batches
    ready_batches: int = 3
    #: GPU decoding: a callable list[bytes] -> list[tensor | Exception], or None for CPU decoding,
    #: and which blobs it takes (the others are decoded on the CPU threads)
    batch_decode: object = None
    gpu_eligible: object = None
    #: Python's first cyclic-GC threshold while the engine runs (only ever raised; 0 = leave it):
    #: see :func:`raise_gc_threshold`
    gc_threshold: int = 10_000


def raise_gc_threshold(threshold: int) -> None:
    """Young collections every ``threshold`` allocations instead of Python's 700 (process-wide;
    never lowered). Every image leaves a record of a dozen GC-tracked objects (pydantic model, its
    dict, labels) alive until its chunk is written; with the default, the collector rescans the
    records in flight (and, at each older collection, the worker's whole heap: torch, Celery) so
    often that it cost more than building them (figures, ``bench_engine.py ceiling``:
    docs/performance.md#the-engines-own-ceiling-bench_enginepy-ceiling-2026-12-06-later). The
    objects are acyclic and freed by reference counting; only genuine cycles wait longer."""
    if threshold > gc.get_threshold()[0]:
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


class _Item:
    __slots__ = ("chunk", "index", "uri", "attempts", "first_try", "data", "etag", "size", "image",
                 "hint", "held")

    def __init__(self, chunk: "Chunk", index: int, uri: str):
        self.chunk = chunk
        self.index = index
        self.uri = uri
        #: the listing's size of the object (an hnq.objects.SourceObject's), reserved before its GET
        self.hint = None if type(uri) is str else getattr(uri, "size", None)
        #: bytes of the engine's budget this item holds now
        self.held = 0
        self.attempts = 0
        self.first_try = 0.0
        self.data = None
        self.etag = None
        self.size = None
        self.image = None


class Chunk:
    """One caller's URIs in the engine. ``result()`` waits for one record per URI, in order."""

    def __init__(self, engine: "Engine", uris: list[str], *, job_id: str | None, name: str,
                 storage_down_retry: bool, top_k: int = 5):
        self.engine = engine
        self.uris = uris
        #: labels per record; the device computes the top runner.k of every batch, each chunk
        #: keeps its own first top_k of them
        self.top_k = top_k
        self.job_id = job_id
        self.name = name
        self.records: list[ResultRecord | None] = [None] * len(uris)
        self._left = len(uris)
        self._transient = 0
        self._storage_down_retry = storage_down_retry
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.closed = False        # cancelled or failed: its remaining images are skipped
        self.started = time.monotonic()
        self.finished: float | None = None
        if not uris:
            self._finish()

    # -- called by the stages --
    def put(self, index: int, record: ResultRecord) -> None:
        with self._lock:
            if self.records[index] is not None or self.closed:
                return
            self.records[index] = record
            self._left -= 1
            if self._left == 0:
                self._finish()

    def transient_failure(self, index: int, record: ResultRecord) -> None:
        """An image gave up after its retries. Storage is taken to be down (the chunk retried
        whole) when more than half of the chunk's images did so; else it is that image's record."""
        with self._lock:
            self._transient += 1
            down = self._storage_down_retry and 2 * self._transient > len(self.uris)
        if down:
            self.fail(StorageDown(
                f"{self._transient} of {len(self.uris)} images of chunk {self.name} failed "
                f"transiently after their retries (last: {record.error.message}); storage looks "
                "down, the chunk will be retried"))
        else:
            self.put(index, record)

    def skip(self, item: _Item) -> None:
        """A stage dropped an item of this closed chunk."""
        self.engine.fetcher.release(item)
        self.engine.batcher.forget()

    def _finish(self) -> None:
        self.finished = time.monotonic()
        self._done.set()
        self.engine.release(self)

    # -- called by the owner --
    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self.closed = True
        self._finish()

    def cancel(self) -> None:
        self.fail(ChunkCancelled(f"chunk {self.name} cancelled"))

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[ResultRecord]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"chunk {self.name} not done after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.records  # type: ignore[return-value]


class Engine:
    """Owns the stages and their threads. ``fetch(uri) -> Fetched`` and ``decode(bytes) -> uint8
    tensor`` are passed in; ``record(uri, top | error, **extra)`` builds the records, whose labels
    name ``categories`` (by class index; the model's weights entry's)."""

    def __init__(self, *, fetch, decode, runner: DeviceRunner, record, cfg: EngineConfig,
                 categories: Sequence[str] = IMAGENET_CATEGORIES):
        self.cfg = cfg
        raise_gc_threshold(cfg.gc_threshold)
        self.runner = runner
        self.record = record
        self.categories = categories
        #: the Classifier behind ``decode``/``record`` when built by :func:`build_engine`
        self.classifier = None
        self.clock = Clock()
        self.batcher = Batcher(cfg.batch_size, cfg.batch_wait_s, cfg.ready_batches * cfg.batch_size)
        self.budget = cfg.budget or ByteBudget(cfg.bytes_in_flight or default_bytes_in_flight())
        self.decoder = DecodeStage(decode, cfg.decode_threads, self._decoded, self._failed,
                                   max_items=cfg.max_fetched_items or max(64, 2 * cfg.batch_size),
                                   max_bytes=cfg.max_fetched_bytes,
                                   batch_decode=cfg.batch_decode, eligible=cfg.gpu_eligible,
                                   batch=cfg.batch_size, release=self._release)
        self.fetcher = FetchStage(fetch, cfg.fetch_threads, cfg.retry, self._fetched, self._failed,
                                  has_room=self.decoder.has_room,
                                  first_threads=cfg.first_fetch_threads, budget=self.budget,
                                  unknown_size=cfg.unknown_size_bytes)
        self.batches = BatchStats()
        self.records_stats = StageStats("records")
        self._chunks_lock = threading.Lock()
        self._chunks: set[Chunk] = set()
        self._closed = False
        self._device = threading.Thread(target=self._device_loop, name="hnq-device", daemon=True)
        self._device.start()

    # -- public --
    def submit(self, uris: list[str], *, job_id: str | None = None, name: str = "",
               storage_down_retry: bool = True, top_k: int = 5) -> Chunk:
        if self._closed:
            raise RuntimeError("engine closed")
        max_k = getattr(self.runner, "k", 5)
        if not 1 <= top_k <= max_k:
            raise ValueError(f"top_k {top_k} outside 1..{max_k} (the device's top-k)")
        chunk = Chunk(self, list(uris), job_id=job_id, name=name or f"{len(uris)} URIs",
                      storage_down_retry=storage_down_retry, top_k=top_k)
        with self._chunks_lock:
            self._chunks.add(chunk)
        self.batcher.expect(len(uris))
        self.fetcher.submit(_Item(chunk, i, u) for i, u in enumerate(chunk.uris))
        return chunk

    def release(self, chunk: Chunk) -> None:
        with self._chunks_lock:
            self._chunks.discard(chunk)

    def chunks_in_flight(self) -> int:
        with self._chunks_lock:
            return sum(1 for c in self._chunks if not c._done.is_set())

    def stats(self) -> dict:
        fq = len(self.fetcher.queue)
        dq, dbytes = self.decoder.depth()
        ready, upstream = self.batcher.depth()
        return {
            "uptime_s": round(self.clock.elapsed(), 1),
            "fetch": {**self.fetcher.stats.snapshot(), "threads": self.fetcher.threads,
                      "max_threads": self.fetcher.max_threads},
            "decode": self.decoder.stats.snapshot(),
            "device": self.batches.snapshot(), "records": self.records_stats.snapshot(),
            "queues": {"to_fetch": fq, "to_decode": dq, "to_decode_bytes": dbytes,
                       "ready": ready, "in_flight": upstream + ready},
            "chunks_in_flight": self.chunks_in_flight(),
            "bytes_in_flight": self.budget.snapshot(),
        }

    def summary(self) -> str:
        s = self.stats()
        d = s["device"]
        return (f"engine: batches={d['batches']} mean={d['mean']} largest={d['largest']} "
                f"images={d['images']} fetch_retries={s['fetch']['retries']} "
                f"in_flight={s['queues']['in_flight']} chunks_in_flight={s['chunks_in_flight']} "
                f"fetch_threads={s['fetch']['threads']} "
                f"busy_s fetch={s['fetch']['busy_s']:.0f} decode={s['decode']['busy_s']:.0f} "
                f"device={d['busy_s']:.1f} of {s['uptime_s']:.0f}s up")

    def close(self) -> None:
        self._closed = True
        self.fetcher.close()
        self.decoder.close()
        self.batcher.close()
        with self._chunks_lock:
            chunks = list(self._chunks)
        for c in chunks:
            c.fail(RuntimeError("engine closed"))

    # -- stage callbacks --
    def _release(self, item: _Item) -> None:
        self.fetcher.release(item)

    def _fetched(self, item: _Item, got) -> None:
        if item.chunk.closed:
            item.chunk.skip(item)
            return
        item.data, item.etag, item.size = got.data, got.etag, got.size
        if not self.decoder.put(item):
            item.chunk.skip(item)

    def _decoded(self, item: _Item) -> None:
        if item.chunk.closed:
            item.chunk.skip(item)
            return
        if not self.batcher.put(item):
            item.chunk.skip(item)

    def _failed(self, item: _Item, error: BaseException, transient: bool) -> None:
        self.fetcher.release(item)
        self.batcher.forget()
        if not isinstance(error, HardnetError):
            error = ImageError(f"{type(error).__name__}: {error}", ErrorCode.internal_error)
        rec = self.record(item.uri, error=error, job_id=item.chunk.job_id, etag=item.etag,
                          size=item.size)
        if transient:
            item.chunk.transient_failure(item.index, rec)
        else:
            item.chunk.put(item.index, rec)

    # -- the device thread --
    def _device_loop(self) -> None:
        inflight = None   # (items, pending) launched and not yet finished
        while True:
            items = self.batcher.take(block=inflight is None)
            if items is None:
                return
            if not items:            # nothing ready right now: deliver the batch in flight
                self._deliver(*inflight)
                inflight = None
                continue
            live = []
            for it in items:
                if it.chunk.closed:
                    it.image = None
                else:
                    live.append(it)
            if not live:
                continue
            t0 = time.monotonic()
            try:
                pending = self.runner.launch([it.image for it in live])
            except Exception as e:  # noqa: BLE001 - a device failure fails these images' chunks
                log.exception("device stage failed on a batch of %d", len(live))
                for it in live:
                    it.chunk.fail(TransientError(f"device failed: {type(e).__name__}: {e}"))
                continue
            for it in live:
                it.image = None
            if inflight is not None:
                self._deliver(*inflight)
                inflight = None
            if pending.result is not None:   # CPU: computed already; deliver without delay
                self._deliver(live, pending, t0)
            else:                            # CUDA: runs while the next batch is prepared
                inflight = (live, pending, t0)

    def _deliver(self, items: list[_Item], pending, t0: float) -> None:
        try:
            scores, idx, ms = self.runner.finish(pending)
        except Exception as e:  # noqa: BLE001
            log.exception("device stage failed finishing a batch of %d", len(items))
            for it in items:
                it.chunk.fail(TransientError(f"device failed: {type(e).__name__}: {e}"))
            return
        self.batches.add(len(items), ms / 1000 if ms is not None else time.monotonic() - t0)
        t1 = time.monotonic()
        categories = self.categories
        for it, srow, irow in zip(items, scores, idx):
            k = it.chunk.top_k
            top = top_labels(srow[:k], irow[:k], categories)
            it.chunk.put(it.index, self.record(it.uri, top, job_id=it.chunk.job_id, etag=it.etag,
                                               size=it.size))
        self.records_stats.add(time.monotonic() - t1, len(items))
