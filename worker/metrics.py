"""Prometheus metrics of a worker process (``HARDNET_METRICS_PORT``; off when unset).

One worker is one process running Celery's threads pool: every chunk's task thread and every engine
stage live in this process, so the metrics are plain in-process objects in prometheus_client's
default registry, served by its HTTP server thread. Names follow Prometheus conventions: base units
(seconds, bytes) in the name, ``_total`` for counters. The list with labels and meanings is in
deploy/README.md ("Metrics"); tests/unit/test_observability.py keeps that list, this module and the
Grafana dashboard in agreement.

Where things are counted:

* records: in :func:`count_records`, called by :func:`part_written` once a part is stored
  (worker.chunk.write_part hands it to hnq.jobs.parts.write_part), so ``hardnet_images_total``
  equals the records written (a chunk written twice, after a redelivery, is counted twice, as
  its part was written twice);
* engine stages: :func:`instrument` points the engine's StageStats/BatchStats observers at the
  histograms (fetch per attempt, decode per CPU image or per GPU batch, device per batch);
* values that exist only at scrape time (images in flight, CUDA memory and utilisation) come from
  :class:`RuntimeCollector`, which reads the live engines when Prometheus asks.

This module imports no torch at import time: torch is only looked at, when it is already loaded."""
from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from collections import Counter as _Tally
from typing import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from hnq.errors import ConfigError

log = logging.getLogger("hardnet.worker")

#: Latency buckets shared by every stage, in seconds: a GPU batch or a CPU decode takes a few ms, an
#: S3 GET tens to hundreds of ms, a part PUT about the same, a fetch that times out or retries
#: seconds to a minute (HARDNET_FETCH_TIMEOUT is 30 s). One set of buckets for all stages keeps the
#: p50/p95 of different stages comparable on one panel.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0, 120.0)
#: A chunk's wall time: about a second on a GPU, minutes on a CPU, and it must stay below the
#: visibility timeout (3600 s by default; docs/scaling.md).
CHUNK_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                 7200.0)
#: Powers of two up to 1024 (HARDNET_BATCH_SIZE is 256 on a GPU by default, at most 4096).
BATCH_BUCKETS = tuple(float(1 << i) for i in range(11))

STAGES = ("fetch", "decode", "gpu_decode", "device", "write")
CHUNK_OUTCOMES = ("done", "retried", "dead_lettered", "cancelled", "duplicate", "deferred")

IMAGES = Counter(
    "hardnet_images", "Records written, by model, status (ok/error) and error code ('' for ok).",
    ["model", "status", "code"])
STAGE_SECONDS = Histogram(
    "hardnet_stage_seconds",
    "Time spent in one step of a stage: fetch = one GET attempt; decode = one image on a CPU "
    "thread; gpu_decode = one nvJPEG batch; device = one batch on the device; write = one part.",
    ["stage"], buckets=STAGE_BUCKETS)
CHUNK_SECONDS = Histogram(
    "hardnet_chunk_seconds", "Wall time of a chunk from its start to its part written and counted "
    "(chunks that completed).", buckets=CHUNK_BUCKETS)
BATCH_SIZE = Histogram(
    "hardnet_batch_size", "Images per batch sent to the device.", ["model"], buckets=BATCH_BUCKETS)
BATCH_CAPACITY = Gauge(
    "hardnet_batch_capacity_images", "The engine's batch size (HARDNET_BATCH_SIZE or the device "
    "default): the fill of the batches is hardnet_batch_size's mean over this.", ["model"])
CHUNKS_IN_FLIGHT = Gauge(
    "hardnet_chunks_in_flight", "Chunk tasks this worker is running now (at most "
    "HARDNET_MAX_CHUNKS_IN_FLIGHT).")
CHUNKS = Counter(
    "hardnet_chunks", "Chunk deliveries by outcome: done (part written), retried (failed, sent "
    "again later), dead_lettered, cancelled (dropped: job cancelled), duplicate (the chunk was "
    "already done: acknowledged, nothing fetched), deferred (another attempt holds its lease: "
    "checked again when it expires).", ["outcome"])
MODEL_LOAD_SECONDS = Gauge(
    "hardnet_model_load_seconds", "Seconds it took to load the model and build its engine "
    "(weights, device, warm-up).", ["model"])
BUILD_INFO = Gauge(
    "hardnet_build_info", "Always 1; the labels say what runs: package version, model, device, "
    "torch version.", ["version", "model", "device", "torch"])

for _stage in STAGES:          # every stage's series exists from the start (0 until used)
    STAGE_SECONDS.labels(_stage)
for _outcome in CHUNK_OUTCOMES:
    CHUNKS.labels(_outcome)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hardnet-queue")
    except PackageNotFoundError:
        return "unknown"


# -- recording ------------------------------------------------------------------------------------
def count_records(records: Iterable) -> None:
    """Count written records by (model, status, code). One inc per distinct label set."""
    counted = getattr(records, "tally", None)    # hnq.objects.PrecodedRecords: from its entries
    if counted is not None:
        for (model, status, code), n in counted().items():
            IMAGES.labels(model, status, code).inc(n)
        return
    tally = _Tally()
    for r in records:
        code = "" if r.error is None else str(getattr(r.error.code, "value", r.error.code))
        tally[(r.model, r.status, code)] += 1
    for (model, status, code), n in tally.items():
        IMAGES.labels(model, status, code).inc(n)


def part_written(seconds: float, records: list) -> None:
    """A part was stored (hnq.jobs.parts.write_part's observer): its write time, then its records."""
    STAGE_SECONDS.labels("write").observe(seconds)
    count_records(records)


def instrument(engine, model: str) -> None:
    """Connect an engine's stage statistics to the histograms (see worker.engine.stats)."""
    engine.fetcher.stats.observer = STAGE_SECONDS.labels("fetch").observe
    engine.decoder.stats.observer = STAGE_SECONDS.labels("decode").observe
    engine.decoder.batch_observer = STAGE_SECONDS.labels("gpu_decode").observe
    device = STAGE_SECONDS.labels("device")
    batch = BATCH_SIZE.labels(model)

    def on_batch(n: int, seconds: float) -> None:
        batch.observe(n)
        device.observe(seconds)

    engine.batches.observer = on_batch
    BATCH_CAPACITY.labels(model).set(engine.cfg.batch_size)


def engine_loaded(model: str, device, seconds: float) -> None:
    import torch  # loaded by the engine just built; not at import (the exporter shares this module)

    MODEL_LOAD_SECONDS.labels(model).set(seconds)
    BUILD_INFO.labels(package_version(), model, str(device), torch.__version__).set(1)


# -- scrape-time values ---------------------------------------------------------------------------
class RuntimeCollector:
    """Values read when Prometheus scrapes: images in the engines, CUDA memory and utilisation.

    ``engines()`` returns the live engines (worker.lifecycle keeps them). CUDA figures are given only
    for CUDA devices of those engines, only once this process has initialised CUDA (a scrape must
    never be what initialises it), and utilisation only when pynvml is installed (torch asks NVML
    for it). Nothing here may raise on a CPU worker or when NVML answers badly: a failing part is
    left out of that scrape. The families are always yielded, empty on a CPU, so that their names
    are known to the registry (and to the dashboard's test)."""

    def __init__(self, engines: Callable[[], list]):
        self.engines = engines
        self.nvml = importlib.util.find_spec("pynvml") is not None
        self._warned: set[str] = set()

    def _families(self):
        return (
            GaugeMetricFamily("hardnet_images_in_flight",
                              "Images admitted to the engines and not yet given a record.",
                              labels=["model"]),
            GaugeMetricFamily("hardnet_fetch_threads",
                              "Fetch threads the engines have started: 8 at first, more (up to "
                              "HARDNET_FETCH_THREADS) while every fetcher waits on the store.",
                              labels=["model"]),
            GaugeMetricFamily("hardnet_gpu_memory_allocated_bytes",
                              "CUDA memory held by tensors (torch.cuda.memory_allocated).",
                              labels=["device"]),
            GaugeMetricFamily("hardnet_gpu_memory_reserved_bytes",
                              "CUDA memory reserved by torch's caching allocator "
                              "(torch.cuda.memory_reserved).", labels=["device"]),
            GaugeMetricFamily("hardnet_gpu_utilization_ratio",
                              "Fraction of the last sample period in which a kernel ran on the GPU "
                              "(NVML via torch.cuda.utilization; only with pynvml installed).",
                              labels=["device"]),
        )

    def describe(self):
        return self._families()

    def _warn_once(self, what: str, e: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("metrics: %s left out (%s: %s)", what, type(e).__name__, e)

    def collect(self):
        in_flight, fetchers, alloc, reserved, util = self._families()
        devices = set()
        try:
            engines = list(self.engines())
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because of us
            self._warn_once("engines", e)
            engines = []
        per_model: dict[str, int] = {}
        threads: dict[str, int] = {}
        for eng in engines:
            try:
                ready, upstream = eng.batcher.depth()
                model = eng.classifier.model_name if eng.classifier is not None else ""
                per_model[model] = per_model.get(model, 0) + ready + upstream
                threads[model] = threads.get(model, 0) + eng.fetcher.threads
                dev = eng.runner.device
                if dev.type == "cuda":
                    devices.add(dev)
            except Exception as e:  # noqa: BLE001
                self._warn_once("images in flight", e)
        for model, n in sorted(per_model.items()):
            in_flight.add_metric([model], n)
        for model, n in sorted(threads.items()):
            fetchers.add_metric([model], n)
        torch = sys.modules.get("torch")
        if devices and torch is not None:
            try:
                ready = torch.cuda.is_initialized()
            except Exception as e:  # noqa: BLE001
                self._warn_once("CUDA state", e)
                ready = False
            for dev in sorted(devices, key=str) if ready else ():
                name = str(dev)
                try:
                    alloc.add_metric([name], float(torch.cuda.memory_allocated(dev)))
                    reserved.add_metric([name], float(torch.cuda.memory_reserved(dev)))
                except Exception as e:  # noqa: BLE001
                    self._warn_once("CUDA memory", e)
                if self.nvml:
                    try:
                        util.add_metric([name], float(torch.cuda.utilization(dev)) / 100.0)
                    except Exception as e:  # noqa: BLE001 - no NVML driver, old pynvml...
                        self._warn_once("GPU utilisation", e)
        yield from (in_flight, fetchers, alloc, reserved, util)


_collector_lock = threading.Lock()
_collector: RuntimeCollector | None = None


def register_runtime(engines: Callable[[], list]) -> RuntimeCollector:
    """Register the scrape-time collector once per process (later calls change its source)."""
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = RuntimeCollector(engines)
            REGISTRY.register(_collector)
        else:
            _collector.engines = engines
        return _collector


# -- the HTTP server ------------------------------------------------------------------------------
_server_lock = threading.Lock()
_server = None


def serve(port: int, addr: str = "0.0.0.0") -> bool:
    """Start the /metrics HTTP server on ``port``, once per process. True if this call started it.
    A port that cannot be bound raises ConfigError naming HARDNET_METRICS_PORT: an operator who
    asked for metrics must not get a worker that silently has none."""
    global _server
    with _server_lock:
        if _server is not None:
            return False
        try:
            _server = start_http_server(port, addr=addr)
        except OSError as e:
            raise ConfigError(f"HARDNET_METRICS_PORT={port}: cannot serve metrics on {addr}:{port} "
                              f"({e.strerror or e}); choose a free port or unset "
                              "HARDNET_METRICS_PORT") from e
        _server_address[:] = [addr, port]
    return True


_server_address: list = []


def served_at() -> str | None:
    """The endpoint's URL once :func:`serve` started it (for the worker's start-up log)."""
    return f"http://{_server_address[0]}:{_server_address[1]}/metrics" if _server_address else None


__all__ = ["IMAGES", "STAGE_SECONDS", "CHUNK_SECONDS", "BATCH_SIZE", "BATCH_CAPACITY",
           "CHUNKS_IN_FLIGHT", "CHUNKS", "MODEL_LOAD_SECONDS", "BUILD_INFO", "RuntimeCollector",
           "count_records", "instrument", "engine_loaded", "register_runtime", "serve", "served_at"]
