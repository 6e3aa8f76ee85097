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
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import ROOT, Meter, median_hi, photo_like_jpeg, rerun_argv


def one(variant: str, n: int) -> dict:
    # torch only in the measuring child (the parent only starts them and prints)
    import torch

    from worker.engine import allowed_cpus
    from worker.image.decode import decode_image

    if variant != "default":
        torch.set_num_threads(int(variant))
    threads = allowed_cpus()
    blobs = [photo_like_jpeg(500, 375, seed=i) for i in range(64)]
    blobs = [blobs[i % 64] for i in range(n)]
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(decode_image, blobs[:128]))         # warm-up: the teams exist from here on
        with Meter() as m:
            list(ex.map(decode_image, blobs))
    return {"rate": n / m.wall, "us": 1e6 * m.cpu / n, "decoders": threads,
            "intra_op": torch.get_num_threads(), "switches": m.switches / n}


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
            out = subprocess.run([*rerun_argv(), "--one", v, "--n", str(a.n)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            m = json.loads(out.strip().splitlines()[-1])
            rows[v].append(m)
            print(f"  round {r + 1} intra-op {v:>7s} ({m['intra_op']} threads, {m['decoders']} decode "
                  f"threads): {m['rate']:.0f} img/s, {m['us']:.0f} us CPU, {m['switches']:.2f} context "
                  f"switches per image", flush=True)

    for v in variants:
        ms = rows[v]
        ratio = median_hi([m["rate"] / b["rate"] for m, b in zip(ms, rows["1"])])
        print(f"RESULT decode threads, intra-op {v} ({ms[0]['intra_op']} threads, {ms[0]['decoders']} "
              f"decode threads): median {median_hi([m['rate'] for m in ms]):.0f} img/s, "
              f"{median_hi([m['us'] for m in ms]):.0f} us CPU and {median_hi([m['switches'] for m in ms]):.2f} "
              f"context switches per image; {ratio:.2f}x intra-op 1 (median of same-round ratios)")


if __name__ == "__main__":
    main()
