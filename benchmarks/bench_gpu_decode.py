"""img/s of JPEG decode + resize + crop: decode_image on all allowed CPU cores vs GpuDecoder.decode_batch.

    python -m benchmarks.bench_gpu_decode [--n 2000] [--repeat 3]

Images: --n photo-like 500x375 quality-90 JPEGs in memory (64 distinct ones, repeated). CPU: one
decode_image per image on a thread pool of len(os.sched_getaffinity(0)) threads, torch intra-op
threads 1 (the worker's decode threads do the same). GPU: decode_batch over the same list in
batches of 64 and 256, results on the device, timed to a device synchronize. Best of --repeat
passes each, after one warm-up pass. Needs CUDA; meant for scripts/gpu_check.sh (well under 30 s). A GPU rate is printed only when
every timed image was decoded by nvJPEG (the decoder's counters): a CPU fallback makes it fail, rc 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks._common import photo_like_jpeg
from worker.image.decode import DEFAULT_MAX_PIXELS, decode_image
from worker.image.gpu_decode import GpuDecoder, resolve_decode_mode


def best_rate(fn, n: int, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_decode: CUDA is not available here; this benchmark needs a GPU "
              "(run it through scripts/gpu_check.sh on a GPU machine)")
        return 2
    dev = torch.device("cuda")
    mode = resolve_decode_mode("auto", dev)
    if mode != "gpu":
        print("bench_gpu_decode: nvJPEG does not work on this device (HARDNET_DECODE=auto resolves to cpu)")
        return 2
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        distinct = list(pool.map(lambda s: photo_like_jpeg(500, 375, s), range(64)))
    blobs = [distinct[i % len(distinct)] for i in range(args.n)]
    mib = sum(map(len, blobs)) / 2**20
    print(f"bench_gpu_decode  torch {torch.__version__}  {torch.cuda.get_device_name(dev)}  "
          f"{threads} CPU threads  N={args.n} JPEGs 500x375 q90 ({mib:.1f} MiB, generated in "
          f"{time.perf_counter() - t0:.1f}s)  repeat {args.repeat}")

    def cpu():
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode_image, blobs, chunksize=16))

    rates = {f"CPU decode_image, {threads} threads": best_rate(cpu, args.n, args.repeat)}
    dec = GpuDecoder(dev, max_pixels=DEFAULT_MAX_PIXELS, cpu_decode=decode_image)
    for bs in (64, 256):
        def gpu(bs=bs):
            for i in range(0, len(blobs), bs):
                out = dec.decode_batch(blobs[i:i + bs])
                assert all(isinstance(t, torch.Tensor) for t in out)
            torch.cuda.synchronize(dev)
        before = dict(dec.stats)
        rates[f"GPU decode_batch, batch {bs}"] = best_rate(gpu, args.n, args.repeat)
        on_cpu = dec.stats["cpu"] - before["cpu"]
        if on_cpu:
            print(f"GPU decode_batch, batch {bs}: failed: {on_cpu} of {(args.repeat + 1) * args.n} images "
                  f"went to the CPU fallback (decoder stats {dec.stats}): no GPU rate")
            return 1
    print(f"decoder stats {dec.stats} (every image on the GPU)")
    base = next(iter(rates.values()))
    for name, r in rates.items():
        print(f"  {name:34s} {r:9.1f} img/s  {r / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
