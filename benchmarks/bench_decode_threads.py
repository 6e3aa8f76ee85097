"""CPU decoding in the engine's decode threads, by torch's intra-op thread count.

    python -m benchmarks.bench_decode_threads [--variants 1,default,16] [--repeat 3] [--n 1536]

The engine decodes on as many threads as this process may use (worker/engine/cpus.py). Each
``decode_image`` resizes with torch, whose kernels split work over an OpenMP team of torch's
intra-op threads, and each calling thread gets a team of its own: D decode threads x T intra-op
threads can be runnable at once on D cores. On a GPU worker the model does not need those
threads, so the worker sets one (``HARDNET_TORCH_THREADS``, worker/engine/cpus.py).

Variants are intra-op thread counts: ``1`` (a GPU worker's setting), ``default`` (torch's own, the
cores it sees), or a number. On a 2-core machine, ``16`` puts as many threads per core as torch's
default does on a 16-core GPU host with 16 decode threads. Each measurement runs in a fresh
process (the teams live for the process), variants interleaved; it prints images/s, CPU and
context switches per image, and each variant's images/s against ``1`` measured in the same round.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(variant: str, n: int) -> dict:
    import resource
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from benchmarks._common import photo_like_jpeg
    from worker.engine import allowed_cpus
    from worker.image.decode import decode_image

    if variant != "default":
        torch.set_num_threads(int(variant))
    threads = allowed_cpus()
    blobs = [photo_like_jpeg(500, 375, seed=i) for i in range(64)]
    blobs = [blobs[i % 64] for i in range(n)]
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(decode_image, blobs[:128]))         # warm-up: the teams exist from here on
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        list(ex.map(decode_image, blobs))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"rate": n / wall, "us": 1e6 * cpu / n, "decoders": threads,
            "intra_op": torch.get_num_threads(),
            "switches": (ru1.ru_nvcsw - ru0.ru_nvcsw + ru1.ru_nivcsw - ru0.ru_nivcsw) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="1,default,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=1536, help="500x375 JPEGs per measurement")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.n)))
        return
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if "1" not in variants:
        variants.insert(0, "1")
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.repeat):
        for v in variants:
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--one", v, "--n", str(a.n)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            m = json.loads(out.strip().splitlines()[-1])
            rows[v].append(m)
            print(f"  round {r + 1} intra-op {v:>7s} ({m['intra_op']} threads, {m['decoders']} decode "
                  f"threads): {m['rate']:.0f} img/s, {m['us']:.0f} us CPU, {m['switches']:.2f} context "
                  f"switches per image", flush=True)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    for v in variants:
        ms = rows[v]
        ratio = med([m["rate"] / b["rate"] for m, b in zip(ms, rows["1"])])
        print(f"RESULT decode threads, intra-op {v} ({ms[0]['intra_op']} threads, {ms[0]['decoders']} "
              f"decode threads): median {med([m['rate'] for m in ms]):.0f} img/s, "
              f"{med([m['us'] for m in ms]):.0f} us CPU and {med([m['switches'] for m in ms]):.2f} "
              f"context switches per image; {ratio:.2f}x intra-op 1 (median of same-round ratios)")


if __name__ == "__main__":
    main()
