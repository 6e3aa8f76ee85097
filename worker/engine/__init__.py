"""The worker's streaming engine (see :mod:`worker.engine.engine`). :func:`build_engine` wires it
to a :class:`~worker.engine.classifier.Classifier` and a fetch policy."""
from __future__ import annotations

import torch

from hnq.options import TOP_K_MAX
from hnq.storage import fetch as fetch_uri  # not `fetch`: the package has a submodule of that name
from worker.engine.budget import default_bytes_in_flight, process_budget
from worker.engine.cpus import allowed_cpus, intra_op_threads
from worker.engine.device import DeviceRunner, default_batch_size
from worker.engine.engine import Chunk, ChunkCancelled, Engine, EngineConfig, StorageDown
from worker.engine.fetch import RetryPolicy
from worker.image.decode import DEFAULT_MAX_PIXELS
from worker.image.gpu_decode import GpuDecoder, resolve_decode_mode

__all__ = ["Engine", "EngineConfig", "Chunk", "ChunkCancelled", "StorageDown", "RetryPolicy",
           "DeviceRunner", "build_engine", "allowed_cpus", "default_batch_size"]


def default_fetch_threads(device_type: str) -> int:
    """Requests in flight: S3 first-byte latency x the device's rate (50 ms x 10,000 img/s = 500
    on a GPU); on the CPU the model sets a rate of tens to hundreds of images/s."""
    return 256 if device_type == "cuda" else 64


def build_engine(clf, policy, *, fetch_threads: int = 0, decode_threads: int = 0,
                 batch_wait_s: float = 0.01, retry: RetryPolicy | None = None,
                 compile: bool = False, cuda_graphs: bool = False, torchscript: str = "auto",
                 decode: str = "cpu", warm_up: bool = False, gc_threshold: int = 10_000,
                 torch_threads: int = 0, bytes_in_flight: int = 0,
                 memory_limit_mb: int | None = None) -> Engine:
    """``decode``: cpu | gpu | auto (HARDNET_DECODE): batched nvJPEG for baseline JPEGs on a CUDA
    device (worker.image.gpu_decode), CPU threads for everything else. ``torch_threads``
    (HARDNET_TORCH_THREADS): see :func:`~worker.engine.cpus.intra_op_threads`; it is set for the
    whole process, as torch has one count. ``bytes_in_flight`` (HARDNET_BYTES_IN_FLIGHT): the
    engine's byte budget, 0 = sized from the process's memory and ``memory_limit_mb``
    (HARDNET_MAX_MEMORY_PER_CHILD_MB; see :func:`worker.engine.budget.default_bytes_in_flight`); an object
    whose size is not announced reserves ``policy.max_bytes``."""
    n = intra_op_threads(clf.device.type, torch_threads)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    # Top TOP_K_MAX on the device for every batch (20 of 1000 classes: the same kernel, 320 B per
    # image back to the host); each chunk keeps its job's own top_k of them.
    runner = DeviceRunner(clf.net, clf.device, clf.batch_size, amp=clf.amp, k=TOP_K_MAX,
                          compile=compile, cuda_graphs=cuda_graphs, torchscript=torchscript,
                          mean=clf.preprocessing.mean, std=clf.preprocessing.std)
    if warm_up:
        runner.warm_up()
    batch_decode = eligible = None
    if resolve_decode_mode(decode, clf.device) == "gpu":
        gpu = GpuDecoder(clf.device, max_pixels=clf.max_pixels or DEFAULT_MAX_PIXELS, cpu_decode=clf.decode)
        batch_decode, eligible = gpu.decode_batch, gpu.eligible
    # one budget per process, whatever the number of engines (models) it serves
    budget = process_budget(bytes_in_flight or default_bytes_in_flight(memory_limit_mb))
    cfg = EngineConfig(
        batch_size=clf.batch_size,
        fetch_threads=fetch_threads or default_fetch_threads(clf.device.type),
        decode_threads=decode_threads or allowed_cpus(),
        batch_wait_s=batch_wait_s,
        retry=retry or RetryPolicy(),
        batch_decode=batch_decode,
        gpu_eligible=eligible,
        gc_threshold=gc_threshold,
        bytes_in_flight=budget.limit,
        budget=budget,
        unknown_size_bytes=policy.max_bytes,
    )
    engine = Engine(fetch=lambda uri, on_size=None: fetch_uri(uri, policy, on_size),
                    decode=clf.decode, runner=runner,
                    record=clf.record, cfg=cfg, categories=clf.categories)
    engine.classifier = clf
    return engine
