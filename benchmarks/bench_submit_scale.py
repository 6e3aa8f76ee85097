"""Submit at scale, measured: N URIs (default 1,000,000) from a file to a real redis-server, with no
worker, through the real CLI (`python -m producer.cli submit --from-file F --out DEST --json`).

Prints, per destination kind (file, and with --s3 moto's S3 server behind a counting proxy):
  producer URIs/s        wall time of the submit process
  producer peak RSS      ru_maxrss of the submit process (memory stays flat: the URIs are streamed)
  Redis bytes per URI    MEMORY USAGE of the queue list, and of every key, divided by N
  storage requests/chunk objects written (file) or HTTP requests seen by the proxy (S3), per chunk

    python -m benchmarks.bench_submit_scale [--n 1000000] [--chunk-size 512] [--s3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, moto_child, proxy_child, s3_bucket
from tests.faultproxy import remote_stats
from tests.servers import RedisServer, s3_env


class S3Child:
    """moto's S3 server and the counting proxy, each in a child process (off this process's GIL)."""

    def __init__(self):
        self.moto = moto_child()
        s3_bucket(self.moto.url, "bench-out")
        self.proxy = proxy_child(self.moto.url)
        self.url = self.proxy.url

    def stats(self) -> dict:
        return remote_stats(self.url)

    def stop(self):
        self.proxy.stop()
        self.moto.stop()


def run_submit(env: dict, listing: Path, dest: str, chunk_size: int) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--from-file", str(listing),
                        "--out", dest, "--chunk-size", str(chunk_size), "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"submit failed ({p.returncode}): {p.stderr[-2000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far (KiB on Linux)
    return wall, max(rss, before) / 1024, json.loads(p.stdout.splitlines()[-1])


def redis_bytes(srv: RedisServer, queue: str) -> tuple[int, int, int]:
    import redis

    r = redis.Redis.from_url(srv.url)
    q = r.memory_usage(queue, samples=0) or 0
    allkeys = sum(r.memory_usage(k, samples=0) or 0 for k in r.scan_iter(count=1000))
    return q, allkeys, r.info("memory")["used_memory"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--s3", action="store_true", help="also to moto's S3 server (behind a request-counting proxy)")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hardnet-bench-submit-"))
    listing = work / "uris.txt"
    with listing.open("w") as f:
        for i in range(a.n):
            f.write(f"s3://photos-archive/2026/05/17/camera-{i % 97:02d}/IMG_{i:08d}.jpg\n")
    avg_len = listing.stat().st_size / a.n - 1
    print(f"{a.n} URIs of {avg_len:.0f} characters on average, chunk size {a.chunk_size}; "
          f"machine: {os.cpu_count()} CPUs")
    srv = RedisServer(work / "redis").start()
    s3 = S3Child() if a.s3 else None
    try:
        kinds = [("file", str(work / "out"))] + ([("s3", "s3://bench-out/run/")] if s3 else [])
        for kind, dest in kinds:
            srv.flush()
            import redis

            base_mem = redis.Redis.from_url(srv.url).info("memory")["used_memory"]
            env = dict(os.environ, HARDNET_BROKER_URL=srv.url, HARDNET_STATE_DIR=str(work / "state"),
                       PYTHONUNBUFFERED="1")
            if s3:
                env.update(s3_env(s3.url))
                before = s3.stats()["requests"]
            wall, rss, sub = run_submit(env, listing, dest, a.chunk_size)
            q, allkeys, used = redis_bytes(srv, "hardnet")
            chunks = sub["chunks"]
            if kind == "file":
                files = sum(1 for _ in (work / "out" / sub["job_id"]).rglob("*"))
                req = f"{files / chunks:.3f} objects written per chunk ({files} for {chunks} chunks)"
            else:
                n_req = s3.stats()["requests"] - before
                req = f"{n_req / chunks:.3f} S3 requests per chunk ({n_req} for {chunks} chunks)"
            print(f"[{kind}] {a.n} URIs in {wall:.1f} s = {a.n / wall:,.0f} URIs/s; producer peak RSS "
                  f"{rss:.0f} MiB; Redis: queue list {q / a.n:.2f} B/URI ({q / chunks:.0f} B per message), "
                  f"all keys {allkeys / a.n:.2f} B/URI, used_memory delta {(used - base_mem) / a.n:.2f} B/URI; "
                  f"{req}")
    finally:
        if s3:
            s3.stop()
        srv.stop()


if __name__ == "__main__":
    main()
