"""Listing one big prefix: one ListObjectsV2 stream against the fanned-out listing
(hnq.storage.s3.listing, `submit --list-threads`), on moto's S3 server (its own process), directly and
behind tests/faultproxy.py adding a fixed delay to every request (closer to real S3, where a
page's round trip, not the server's CPU, is what a single stream waits for).

    python -m benchmarks.bench_listing [--keys 100000] [--prefixes 100] [--threads 8] [--delay 0.05]

Setup: KEYS empty objects under PREFIXES folders (set/pNNN/img-NNNNNN.jpg), plus a flat prefix
(no folders) of FLAT keys. PUTs over HTTP with 32 threads are timed on a sample and printed (too
slow on moto to write them all; figures: docs/whole-bucket.md#measured-listing-rates), then the
keys are written into moto's store directly, in the moto server's process; the listings are all
over HTTP. Every run lists every key under the prefix and checks the count; printed: keys/s,
requests, moto's CPU seconds, and the parallel/single ratio.

Caveat printed with the numbers: moto answers each ListObjectsV2 by scanning (and sorting) every
key of the bucket that matches the prefix, in Python, on this machine's 2 shared cores. A single
stream of 100 pages pays that full-prefix scan and sort 100 times; the fanned-out listing scans
once per folder but sorts only the folder. So on moto the ratio mixes two things: overlapping
round trips (what S3 gains too) and moto's per-request cost (which S3 does not have). The delayed
runs add a round trip per request, which is where S3's single stream loses its time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import Child, cpu_s, moto_child, proxy_child, s3_client_for
from hnq.storage import reset_s3_client
from hnq.storage.s3.listing import ListingStats, list_objects, listing_client
from tests.faultproxy import remote_set_fault
from tests.servers import s3_env


def _put_rate(url: str, n: int, threads: int = 32) -> float:
    """PUT/s of n empty objects over HTTP with `threads` threads (what the direct fill avoids)."""
    c = s3_client_for(url, pool=64)
    c.create_bucket(Bucket="putrate")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda i: c.put_object(Bucket="putrate", Key=f"k/{i:06d}.jpg", Body=b""), range(n)))
    return n / (time.perf_counter() - t0)


def _list(bucket: str, prefix: str, threads: int, depth: int, server) -> dict:
    listing_client()          # made before the clock starts (a new endpoint: a new client)
    st = ListingStats()
    cpu0, me0 = server.cpu_s(), cpu_s()
    t0 = time.perf_counter()
    n = sum(1 for _ in list_objects(bucket, prefix, threads=threads, depth=depth, stats=st))
    wall = time.perf_counter() - t0
    return {"keys": n, "wall": wall, "rate": n / wall, "requests": st.requests, "units": st.units,
            "server_cpu": server.cpu_s() - cpu0, "client_cpu": cpu_s() - me0}


def _stub(keys: int, folders: int, delay: float):
    return Child([sys.executable, "-m", "benchmarks.s3_list_stub", "--bucket", "stub",
                  "--prefix", "set/", "--keys", str(keys), "--folders", str(folders), "--delay", str(delay)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--prefixes", type=int, default=100)
    ap.add_argument("--flat", type=int, default=20_000, help="keys of the flat prefix")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.05, help="seconds the proxy adds to each request")
    ap.add_argument("--put-sample", type=int, default=2000, help="HTTP PUTs timed to show the setup rate")
    ap.add_argument("--servers", default="moto,proxy,stub",
                    help="which of moto, proxy (moto + delay), stub (list stand-in + delay) to measure")
    a = ap.parse_args()

    moto = moto_child()
    proxy = None
    try:
        rate = _put_rate(moto.url, a.put_sample)
        print(f"setup: PUT over HTTP, 32 threads: {rate:.0f} objects/s ({a.put_sample} objects; "
              f"{a.keys} would take {a.keys / rate:.0f} s), so the keys are written into moto's store "
              "directly (its backend API in the server's process); every listing below is over HTTP")
        setup = moto.fill("bench", "set/", a.keys, a.prefixes)
        print(f"setup: {a.keys} keys under {a.prefixes} prefixes in {setup:.1f} s")
        setup_f = moto.fill("benchflat", "flat/", a.flat, 0)
        print(f"setup: {a.flat} keys under one flat prefix in {setup_f:.1f} s")
        keys, flat = range(a.keys), range(a.flat)
        proxy = proxy_child(moto.url)
        remote_set_fault(proxy.url, "slow", delay=a.delay)
        rows = []
        layouts = ((f"{a.prefixes} prefixes", "bench", "set/", len(keys)), ("flat", "benchflat", "flat/", len(flat)))
        servers = a.servers.split(",")
        for where, url in (("moto", moto.url), (f"moto + {a.delay * 1000:.0f} ms/request", proxy.url)):
            if ("moto" if url == moto.url else "proxy") not in servers:
                continue
            os.environ.update(s3_env(url))
            reset_s3_client()
            for name, bucket, prefix, n in layouts:
                one = _list(bucket, prefix, 1, a.depth, moto)
                par = _list(bucket, prefix, a.threads, a.depth, moto)
                assert one["keys"] == par["keys"] == n, (one, par, n)
                rows.append((where, name, one, par))
        for name, folders, n in ((f"{a.prefixes} prefixes", a.prefixes, a.keys), ("flat", 0, a.flat)):
            if "stub" not in servers:
                break
            stub = _stub(n, folders, a.delay)
            try:
                os.environ.update(s3_env(stub.url))
                reset_s3_client()
                one = _list("stub", "set/", 1, a.depth, stub)
                par = _list("stub", "set/", a.threads, a.depth, stub)
                assert one["keys"] == par["keys"] == n, (one, par, n)
                rows.append((f"list stub + {a.delay * 1000:.0f} ms/request", name, one, par))
            finally:
                stub.stop()
        print()
        print(f"| server | layout | keys | single stream: keys/s (requests; server, client CPU s) | "
              f"{a.threads} threads, depth {a.depth}: keys/s (requests; server, client CPU s) | ratio |")
        print("|---|---|---|---|---|---|")
        for where, name, one, par in rows:
            def cell(r):
                return (f"{r['rate']:,.0f} ({r['requests']}; {r['server_cpu']:.1f}, {r['client_cpu']:.1f})")
            print(f"| {where} | {name} | {one['keys']:,} | {cell(one)} | {cell(par)} | {par['rate'] / one['rate']:.2f}x |")
        print()
        moto_rows = [(one, par) for where, _, one, par in rows if where.startswith("moto") and one["keys"] >= 50_000]
        if moto_rows:
            one, par = moto_rows[0]
            print(f"moto: its CPU per listed key was {1000 * one['server_cpu'] / one['keys']:.2f} ms in the single "
                  f"stream and {1000 * par['server_cpu'] / par['keys']:.2f} ms fanned out. It scans and sorts every "
                  "key under the request's prefix for each request (a single stream sorts the whole prefix for "
                  "every page, a folder's listing only the folder) and renders each key in Python, one request "
                  "at a time in effect: its CPU is the limit, with or without the added delay, and the moto "
                  "ratio reflects its algorithm, not S3's.")
        stub_rows = [(one, par) for where, _, one, par in rows if where.startswith("list stub") and one["keys"] >= 50_000]
        if stub_rows:
            one, par = stub_rows[0]
            print(f"list stub: answers from a sorted list in microseconds and overlaps concurrent requests, as S3 "
                  f"does. A single stream waits one round trip per page; fanned out, the round trips overlap "
                  f"and the client's CPU is the limit: {1000 * par['client_cpu'] / par['keys']:.3f} ms per key "
                  f"(boto3 parsing the XML, one core under the GIL), i.e. at most "
                  f"{par['keys'] / par['client_cpu']:,.0f} keys/s in this process.")
        print("2-core machine shared with other work.")
    finally:
        if proxy is not None:
            proxy.stop()
        moto.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
