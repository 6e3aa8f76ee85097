"""S3 GET client cost: boto3 vs obstore through hnq.storage.fetch.

Starts moto's S3 server in a child process (tests/servers.MotoS3, through benchmarks/_common),
so that this process's CPU time is the client's alone; puts N objects of about SIZE bytes and
fetches all of them with each client at each thread count, interleaved over the repeats
(user + sys of every thread of this process, obstore's Rust ones too). Prints
objects/s and client CPU ms per object (median over the repeats), and the obstore/boto3 ratios
of the same run.

    python -m benchmarks.bench_s3_get [--n 400] [--size 100000] [--threads 8,32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import Meter, moto_child, s3_bucket
from hnq.storage import FetchPolicy, fetch, reset_s3_client
from tests.servers import s3_env

CLIENTS = ("boto3", "obstore")


def run_once(uris: list[str], policy, threads: int, expect: int) -> tuple[float, float]:
    """(wall s, client CPU s) to fetch every URI once."""
    def one(u: str) -> int:
        return fetch(u, policy).size

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, uris[:threads]))  # warm: connections, stores, credentials
        with Meter() as m:
            total = sum(pool.map(one, uris))
    assert total == expect, (total, expect)
    return m.wall, m.cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="objects (400)")
    ap.add_argument("--size", type=int, default=100_000, help="bytes per object (100000)")
    ap.add_argument("--threads", default="8,32", help="thread counts, comma-separated (8,32)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per client and thread count (3)")
    args = ap.parse_args(argv)
    threads = [int(x) for x in args.threads.split(",") if x.strip()]

    moto = moto_child()
    try:
        os.environ.update(s3_env(moto.url))
        import obstore  # noqa: F401  (fail early when it is missing)

        reset_s3_client()
        t0 = time.perf_counter()
        keys = [f"img/{i:05d} photo.jpg" for i in range(args.n)]
        s3_bucket(moto.url, "bench", [(k, os.urandom(args.size)) for k in keys])
        uris = [f"s3://bench/{k}" for k in keys]
        expect = args.n * args.size
        import importlib.metadata as md

        print(f"bench_s3_get {time.strftime('%Y-%m-%dT%H:%M:%S')}  python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs, boto3 {md.version('boto3')}, obstore {md.version('obstore')}, "
              f"moto {md.version('moto')} (server in a child process)")
        print(f"N={args.n} objects of {args.size} bytes (put in {time.perf_counter() - t0:.1f}s), "
              f"threads {threads}, repeat {args.repeat}, load {os.getloadavg()[0]:.2f}")
        res: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for r in range(args.repeat):
            for th in threads:
                order = CLIENTS if r % 2 == 0 else CLIENTS[::-1]
                for client in order:
                    wall, used = run_once(uris, FetchPolicy(s3_client=client), th, expect)
                    res.setdefault((client, th), []).append((wall, used))
                    print(f"  repeat {r + 1}/{args.repeat} {client:>7} x{th:<3} {args.n / wall:8.1f} obj/s "
                          f"{used / args.n * 1000:6.3f} CPU ms/obj", flush=True)
        print()
        print(f"{'client':<8} {'threads':>7} {'objects/s':>10} {'CPU ms/obj':>11}   objects/s min..max")
        med = {}
        for th in threads:
            for client in CLIENTS:
                runs = res[(client, th)]
                rates = [args.n / w for w, _ in runs]
                cpu_ms = statistics.median(u / args.n * 1000 for _, u in runs)
                med[(client, th)] = (statistics.median(rates), cpu_ms)
                print(f"{client:<8} {th:>7} {med[(client, th)][0]:>10.1f} {cpu_ms:>11.3f}   "
                      f"{min(rates):.1f}..{max(rates):.1f}")
        print()
        print("obstore / boto3 (medians of the same run):")
        for th in threads:
            (ro, co), (rb, cb) = med[("obstore", th)], med[("boto3", th)]
            print(f"  {th:>2} threads: objects/s {ro / rb:.2f}x, CPU ms/obj {co / cb:.2f}x")
    finally:
        moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
