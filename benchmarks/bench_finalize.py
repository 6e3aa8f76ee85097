"""Finalisation cost of a big job: the labelled index (and manifest) built from its parts.

A job of N precoded-style records (JSON Lines parts of 512 records, the worker's own record
format; every 10th an error record) in a local destination, then ``hnq.jobs.index.build_index``
(what finalisation runs for `--index` / `--skip-labelled` jobs) timed, with its peak RSS growth.
Prints figures; asserts nothing about time.

    python -m benchmarks.bench_finalize --records 200000
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from hnq.jobs.index import build_index
from hnq.storage import open_destination


def make_job(root: Path, job: str, n: int, per_part: int = 512) -> None:
    d = root / job
    d.mkdir(parents=True)
    for p in range(0, n, per_part):
        lines = []
        for i in range(p, min(n, p + per_part)):
            uri = f"s3://photos-archive/2026/05/17/camera-{i % 97:02d}/IMG_{i:08d}.jpg"
            if i % 10 == 9:
                r = {"uri": uri, "status": "error", "model": "hardnet68", "job_id": job,
                     "error": {"code": "decode_error", "message": "cannot identify image file"}}
            else:
                r = {"uri": uri, "status": "ok", "model": "hardnet68", "weights": "official",
                     "top5": [{"index": k, "label": f"label {k}", "score": 0.1} for k in range(5)],
                     "job_id": job, "etag": f"{i:032x}", "size": 12345}
            lines.append(json.dumps(r, separators=(",", ":")))
        (d / f"part-{p // per_part:05d}.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--keep", help="copy the index built here (to compare implementations)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-finalize-"))
    try:
        make_job(root, "job", a.records)
        d = open_destination(str(root))
        for run in range(a.runs):
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0, c0 = time.perf_counter(), time.process_time()
            # as finalisation calls it: the estimate is the job's succeeded count
            meta = build_index(d, "job", estimate=a.records - a.records // 10)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"run {run}: {a.records} records -> index of {meta['count']} in {len(meta['shards'])} shards: "
                  f"{wall:.2f} s wall, {cpu:.2f} s CPU ({1e6 * cpu / a.records:.1f} us CPU/record), "
                  f"peak RSS growth {(rss1 - rss0) / 1024:.0f} MiB")
        if a.keep:
            shutil.copytree(root / "job" / "index", a.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
