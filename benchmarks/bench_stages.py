"""Why the engine's stages are our own threads and bounded queues, not SPDL or torchdata.nodes: the
same work through each, measured in the same run.

    pip install spdl==0.8.0                     # only for this comparison; not dependencies of
    pip install --no-deps torchdata==0.11.0     # the project (--no-deps: keep our torch)
    python -m benchmarks.bench_stages [--n 2000] [--latency-ms 20] [--repeat 3]

Work: N in-memory 500x375 JPEGs; "fetch" sleeps ``--latency-ms`` (a remote store's latency, GIL
released) and returns the bytes; decode is the worker's `decode_image`; batches of 32; the
"device" is a zero-cost stand-in (torch.stack of the batch). Both sides: 64 fetches in flight,
as many decode threads as allowed CPUs, completion order.

(ours)  worker.engine.Engine (fetch -> decode -> batcher -> device runner -> records, per chunk)
        fed chunks of 256, with benchmarks/_common.zero_cost_runner as the device stage.
(spdl)  spdl.pipeline.PipelineBuilder: source -> pipe(fetch, concurrency=64) -> pipe(decode,
        concurrency=CPUs) -> aggregate(32) -> pipe(stack) -> sink, on a 64+CPUs thread pool;
        records are not built (less work than ours).
(torchdata) torchdata.nodes: IterableWrapper -> ParallelMapper(fetch, 64 threads, in_order=False)
        -> ParallelMapper(decode, CPUs threads, in_order=False) -> Batcher(32) -> Mapper(stack)
        -> Loader; records are not built either.

Prints images/s and CPU ms/image (this process, all threads) per side, median of repeats."""
from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks._common import (Meter, photo_like_jpeg, quiet_random_weights, reexec_with_malloc_tuning,
                                zero_cost_runner)


def main() -> None:
    reexec_with_malloc_tuning()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    quiet_random_weights()
    # after the re-exec above: the process that measures is the only one that loads torch
    import torch

    from hnq.storage import Fetched
    from worker.engine import Engine, EngineConfig, allowed_cpus
    from worker.image.decode import decode_image
    from worker.engine.classifier import Classifier

    cpus = allowed_cpus()
    blobs = {f"mem://{i}": photo_like_jpeg(500, 375, seed=i) for i in range(a.n)}
    uris = list(blobs)
    lat = a.latency_ms / 1000

    def fetch(uri: str) -> Fetched:
        time.sleep(lat)
        d = blobs[uri]
        return Fetched(data=d, etag=None, size=len(d))

    clf = Classifier("hardnet39ds", "random", device="cpu", batch_size=32)
    runner = zero_cost_runner(clf.device, 32)
    eng = Engine(fetch=fetch, decode=decode_image, runner=runner, record=clf.record,
                 cfg=EngineConfig(batch_size=32, fetch_threads=64, decode_threads=cpus))

    def ours() -> int:
        chunks = [eng.submit(uris[i:i + 256]) for i in range(0, a.n, 256)]
        return sum(len(c.result()) for c in chunks)

    try:
        from spdl.pipeline import PipelineBuilder
    except ImportError:
        PipelineBuilder = None

    def spdl() -> int:
        pipe = (PipelineBuilder()
                .add_source(uris)
                .pipe(lambda u: fetch(u).data, concurrency=64)
                .pipe(decode_image, concurrency=cpus)
                .aggregate(32)
                .pipe(lambda xs: torch.stack(xs), concurrency=1)
                .add_sink(4)
                .build(num_threads=64 + cpus))
        n = 0
        with pipe.auto_stop():
            for batch in pipe:
                n += batch.shape[0]
        return n

    try:
        from torchdata import nodes as tdn
    except ImportError:
        tdn = None

    def torchdata() -> int:
        node = tdn.IterableWrapper(uris)
        node = tdn.ParallelMapper(node, map_fn=lambda u: fetch(u).data, num_workers=64, method="thread",
                                  in_order=False)
        node = tdn.ParallelMapper(node, map_fn=decode_image, num_workers=cpus, method="thread",
                                  in_order=False)
        node = tdn.Mapper(tdn.Batcher(node, batch_size=32, drop_last=False), torch.stack)
        return sum(batch.shape[0] for batch in tdn.Loader(node))

    sides = ([("ours", ours)] + ([("spdl", spdl)] if PipelineBuilder else [])
             + ([("torchdata", torchdata)] if tdn else []))
    print(f"bench_stages: N={a.n} JPEGs 500x375, fetch latency {a.latency_ms} ms, 64 fetches in flight, "
          f"{cpus} decode threads, batch 32, zero-cost device; load {os.getloadavg()}")
    if PipelineBuilder is None:
        print("spdl is not installed (pip install spdl==0.8.0): not measured")
    if tdn is None:
        print("torchdata is not installed (pip install --no-deps torchdata==0.11.0): not measured")
    res: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in sides}
    for r in range(a.repeat):
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            with Meter() as m:
                n = fn()
            assert n == a.n, (name, n)
            res[name].append((n / m.wall, 1000 * m.cpu / n))
            print(f"  repeat {r + 1} {name}: {n / m.wall:.0f} img/s, {1000 * m.cpu / n:.2f} CPU ms/img", flush=True)
    eng.close()
    print(f"\n{'side':9} {'img/s':>8} {'CPU ms/img':>11}   (median of {a.repeat})")
    for name, rows in res.items():
        print(f"{name:9} {statistics.median(r[0] for r in rows):8.0f} {statistics.median(r[1] for r in rows):11.2f}")
    o = statistics.median(r[0] for r in res["ours"])
    for other in [k for k in res if k != "ours"]:
        print(f"ours / {other} images/s: {o / statistics.median(r[0] for r in res[other]):.2f}x")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
