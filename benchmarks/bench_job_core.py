"""The job core at a million records, through the public CLI, without model time (issue 19).

An S3 Inventory report (CSV, gzip, in moto's S3 server in a child process) lists N objects, every
one in the GLACIER storage class: the producer precodes each of them (hnq.objects: an ``archived``
record decided before any fetch) and the worker fetches nothing and labels nothing; it only reads
each chunk's stored inputs, makes the records, writes the parts, counts them and finalises the job.
What is timed is what the job costs beyond the images themselves, with a real redis-server and one
real ``hardnet worker`` process (its defaults, hardnet39ds with random weights on the CPU):

    hardnet submit --inventory s3://inv/... --out DIR --wait --json     (this tree's CLI)
    hardnet results JOB --output FILE

Printed, each measured in this run, beside the issue's targets:
  submit time          CLI start -> the job's summary line (the report read, every chunk sent)
  job time             CLI start -> ``--wait`` exit, and records/s of the job core (N / job time)
  worker CPU/record    user+system CPU of the worker process (all threads, /proc) from before the
                       submit to after the end, over N; its idle CPU over the same time beside it
  worker peak RSS      VmHWM of the worker process (the model loaded at start-up included)
  Redis peak           INFO used_memory_peak (and used_memory before the job)
  finalisation         the last chunk's completion (Redis) -> the job's finished_at
  results              ``hardnet results JOB --output FILE``: records/s and CPU per record of the
                       process (RUSAGE_CHILDREN), its line count checked against N

    python -m benchmarks.bench_job_core                      # 1,000,000 records
    python -m benchmarks.bench_job_core --records 10000000   # ~10x the time; moto holds the report

Figures and their reading: docs/performance.md, "Job core at a million records"; the 100M
figures derived from them: docs/scaling.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import ROOT, Queue, cpu_s, log, moto_child, s3_client_for

#: the issue's targets (issue 19, "Show it")
TARGET_WORKER_US = 25.0
TARGET_FINAL_S = 15.0
TARGET_RESULTS_US = 5.0
TARGET_WORKER_RSS_MIB = 1024.0
TARGET_REDIS_MIB = 64.0

SOURCE_BUCKET = "photos-archive"
ROWS_PER_FILE = 500_000


def inventory_files(n: int, per_file: int = ROWS_PER_FILE):
    """gzip CSV data files of an S3 Inventory report (no header, the columns of
    tests.inventories.SCHEMA) listing n GLACIER objects, made a file at a time."""
    for lo in range(0, n, per_file):
        rows = [f'"{SOURCE_BUCKET}","2026/05/17/camera-{i % 97:02d}/IMG_{i:08d}.jpg","v1","true","false",'
                f'"{100_000 + i % 9_000_000}","2026-11-30T00:00:00.000Z","{i:032x}","GLACIER",""\n'
                for i in range(lo, min(n, lo + per_file))]
        yield gzip.compress("".join(rows).encode(), compresslevel=1)


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (the worker runs Celery's threads pool in one process; counted in
    case a child appears)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_s(p)
        except OSError:
            pass
    return total


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread alone (in a `hardnet worker`: Celery's consumer,
    which receives and acknowledges the messages; the chunks run on its pool threads)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    best = 0.0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


def run_stamped(argv: list[str], env: dict[str, str], timeout: float):
    """argv's exit code, its stdout lines each with the time.perf_counter() it arrived, its stderr."""
    p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    out: list[tuple[float, str]] = []
    errs: list[str] = []

    def pump_out():
        for line in p.stdout:
            out.append((time.perf_counter(), line.rstrip("\n")))

    def pump_err():
        for line in p.stderr:
            errs.append(line.rstrip("\n"))

    threads = [threading.Thread(target=pump_out), threading.Thread(target=pump_err)]
    for t in threads:
        t.start()
    p.wait(timeout)
    for t in threads:
        t.join()
    return p.returncode, out, errs


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=None, help="unset: the CLI's default")
    ap.add_argument("--model", default="hardnet39ds", help="the worker's model (loaded, never run)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (parts, logs)")
    a = ap.parse_args()
    n = a.records
    tmp = Path(tempfile.mkdtemp(prefix="hardnet-bench-core-"))
    with open("/proc/loadavg") as f:
        load0 = " ".join(f.read().split()[:3])
    log(f"bench_job_core: {n:,} GLACIER objects in an inventory report; {os.cpu_count()} CPUs; "
        f"load average {load0}; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    moto = moto_child()
    q = None
    try:
        from tests.inventories import put_inventory
        from tests.servers import s3_env

        t0 = time.perf_counter()
        s3 = s3_client_for(moto.url)
        manifest = put_inventory(s3, source_bucket=SOURCE_BUCKET, rows=[], data_files=inventory_files(n))
        log(f"report {manifest}: {n:,} rows in {-(-n // ROWS_PER_FILE)} files, made and stored in "
            f"{time.perf_counter() - t0:.1f} s")
        out_dir = tmp / "out"
        q = Queue(tmp, {"HARDNET_MODEL": a.model, "HARDNET_OUTPUT_ROOTS": str(tmp), **s3_env(moto.url)})
        env = {k: v for k, v in q.env.items() if k != "HARDNET_POLL_INTERVAL"}   # the user's default
        import redis

        r = redis.Redis.from_url(q.redis.url)
        mem0 = r.info("memory")
        wpid = q.worker.proc.pid
        # the worker's idle CPU rate, to read its CPU per record against
        i0, it = tree_cpu(wpid), time.perf_counter()
        time.sleep(3.0)
        idle_rate = (tree_cpu(wpid) - i0) / (time.perf_counter() - it)

        argv = [sys.executable, "-m", "producer.cli", "submit", "--inventory", manifest, "--out",
                str(out_dir), "--wait", "--json"] + (["--chunk-size", str(a.chunk_size)] if a.chunk_size else [])
        w0, m0, c0 = tree_cpu(wpid), main_thread_cpu(wpid), children_cpu()
        t0 = time.perf_counter()
        rc, out, errs = run_stamped(argv, env, timeout=6 * 3600)
        t1 = time.perf_counter()
        w1, m1, c1 = tree_cpu(wpid), main_thread_cpu(wpid), children_cpu()
        rss = peak_rss_mib(wpid)
        mem1 = r.info("memory")
        if len(out) < 2:
            raise RuntimeError(f"submit rc={rc}: {errs[-20:]}\n{q.worker.log()[-3000:]}")
        first, info = json.loads(out[0][1]), json.loads(out[-1][1])
        # every record is an error record: the job ends `failed` (exit 4), which is what is expected
        if info.get("state") not in ("failed", "done_with_errors") or info.get("failed") != n:
            raise RuntimeError(f"submit rc={rc}, job {info}: {errs[-20:]}\n{q.worker.log()[-3000:]}")
        job = info["job_id"]
        submit_s, job_s = out[0][0] - t0, t1 - t0
        from hnq.jobs.store import JobStore

        store = JobStore(q.redis.url, 1)
        h = store.raw(job)
        done_t = store.done_times(job)
        started, finished = float(h["started_at"]), float(h["finished_at"])
        last_done = max(done_t.values())
        final_s = finished - last_done
        worker_cpu = w1 - w0
        idle_cpu = idle_rate * job_s

        # hardnet results
        res_file = tmp / "results.jsonl"
        r0, rt = children_cpu(), time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "producer.cli", "results", job, "--partial", "--output", str(res_file)],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        res_s, res_cpu = time.perf_counter() - rt, children_cpu() - r0
        if p.returncode != 0:
            raise RuntimeError(f"results rc={p.returncode}: {p.stderr[-2000:]}")
        with open(res_file, "rb") as f:
            lines = sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 22), b""))
        with open(res_file) as f:
            sample = json.loads(f.readline())

        log(f"job {job}: state {info['state']}, {info['total']:,} records ({info['failed']:,} failed, "
            f"codes {info.get('error_codes')}), {first['chunks']} chunks; a record: {json.dumps(sample)[:160]}...")
        if info["total"] != n or lines != n:
            raise RuntimeError(f"expected {n} records: the job has {info['total']}, results printed {lines}")
        log(f"submit CLI CPU (with its --wait polling) {c1 - c0:.1f} s")
        log(f"submit time         {submit_s:8.1f} s (CLI start -> the job's summary: report read, "
            f"{first['chunks']} chunks sent) = {n / submit_s:,.0f} records/s")
        log(f"job time            {job_s:8.1f} s (CLI start -> --wait exit) = {n / job_s:,.0f} records/s "
            f"of the job core; first chunk started -> finished_at {finished - started:.1f} s")
        us = 1e6 * worker_cpu / n
        log(f"worker CPU          {us:8.1f} us/record ({worker_cpu:.1f} s; idle rate {idle_rate:.3f} CPU "
            f"-> {idle_cpu:.1f} s of it, {1e6 * (worker_cpu - idle_cpu) / n:.1f} us/record net)   "
            f"target <= {TARGET_WORKER_US:g}: {verdict(us <= TARGET_WORKER_US)}")
        log(f"worker CPU by thread: the main thread (Celery's consumer: receive, acknowledge) {1e6 * (m1 - m0) / n:.1f} "
            f"us/record, the other threads (the chunks, leases, finaliser) {1e6 * (worker_cpu - m1 + m0) / n:.1f}")
        log(f"worker peak RSS     {rss:8.0f} MiB   target <= {TARGET_WORKER_RSS_MIB:.0f}: "
            f"{verdict(rss <= TARGET_WORKER_RSS_MIB)}")
        peak = mem1["used_memory_peak"] / 2**20
        log(f"Redis peak          {peak:8.1f} MiB (used_memory before the job {mem0['used_memory'] / 2**20:.1f} "
            f"MiB, after {mem1['used_memory'] / 2**20:.1f})   target <= {TARGET_REDIS_MIB:g}: "
            f"{verdict(peak <= TARGET_REDIS_MIB)}")
        log(f"finalisation        {final_s:8.1f} s (last chunk completed -> finished_at)   "
            f"target <= {TARGET_FINAL_S:g}: {verdict(final_s <= TARGET_FINAL_S)}")
        rus = 1e6 * res_cpu / n
        log(f"hardnet results     {n / res_s:8,.0f} records/s ({res_s:.1f} s), {rus:.2f} us CPU/record "
            f"({res_cpu:.1f} s)   target <= {TARGET_RESULTS_US:g} us: {verdict(rus <= TARGET_RESULTS_US)}")
        with open("/proc/loadavg") as f:
            log(f"load average at the end {' '.join(f.read().split()[:3])}")
    finally:
        if q is not None:
            q.stop()
        moto.stop()
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
