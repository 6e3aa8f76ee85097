"""The worker's streaming engine (see :mod:`worker.engine.engine`). :func:`build_engine` wires it
to a :class:`~worker.pipeline.predict.Classifier` and a fetch policy."""
from __future__ import annotations

from worker.engine.cpus import allowed_cpus
from worker.engine.device import DeviceRunner, default_batch_size
from worker.engine.engine import Chunk, ChunkCancelled, Engine, EngineConfig, StorageDown
from worker.engine.fetch import RetryPolicy

__all__ = ["Engine", "EngineConfig", "Chunk", "ChunkCancelled", "StorageDown", "RetryPolicy",
           "DeviceRunner", "build_engine", "allowed_cpus", "default_batch_size"]


def default_fetch_threads(device_type: str) -> int:
    """Requests in flight: S3 first-byte latency x the device's rate (50 ms x 10,000 img/s = 500
    on a GPU); on the CPU the model sets a rate of tens to hundreds of images/s."""
    return 256 if device_type == "cuda" else 64


def build_engine(clf, policy, *, fetch_threads: int = 0, decode_threads: int = 0,
                 batch_wait_s: float = 0.01, retry: RetryPolicy | None = None,
                 compile: bool = False, cuda_graphs: bool = False,
                 batch_decode=None, warm_up: bool = False) -> Engine:
    from hnq.storage import fetch

    runner = DeviceRunner(clf.net, clf.device, clf.batch_size, amp=clf.amp, compile=compile,
                          cuda_graphs=cuda_graphs)
    if warm_up:
        runner.warm_up()
    cfg = EngineConfig(
        batch_size=clf.batch_size,
        fetch_threads=fetch_threads or default_fetch_threads(clf.device.type),
        decode_threads=decode_threads or allowed_cpus(),
        batch_wait_s=batch_wait_s,
        retry=retry or RetryPolicy(),
        batch_decode=batch_decode,
    )
    return Engine(fetch=lambda uri: fetch(uri, policy), decode=clf.decode, runner=runner,
                  record=clf.record, cfg=cfg)
