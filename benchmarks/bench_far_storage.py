"""Far storage through the public CLI: what the user sees against the model limit (issue 20, item 4).

    python -m benchmarks.bench_far_storage [--n 192] [--latency-ms 80] [--chunk-size 16] [--repeat 1]

hardnet39ds, random weights, on the CPU. N photo-like JPEGs (500x375) in moto's S3 server; moto
and a recording fault proxy (tests/faultproxy.py, one child process each) that adds LATENCY to
EVERY request: the images, the claim-check inputs, job.json, the parts, the manifest, the index and
the purge. A real redis-server and one real `hardnet worker` process (benchmarks/_common.Queue)
with its defaults. The time the user sees: `hardnet submit s3://bench/img/ --out s3://out/run/
--chunk-size 16 --wait --json` from its start to its exit, with the CLI's default poll interval.

Beside it, in the same run:

- the model limit: normalise + forward + top-k alone on pre-decoded uint8 batches of 32 in this
  process (bench_engine.model_limit, latency39's limit), measured right before the worker starts
  and right after it stops (mean), then scaled by the CPU share the storage emulator (moto + proxy,
  read from /proc during the submit) took of the machine: limit x (1 - share);
- the in-worker time: the job's started_at (the first chunk started) -> the last chunk's part
  written (its `done` time in Redis), the worker's own view;
- a timeline of the user's wall time cut into consecutive spans (CLI start-up, submit until the
  first chunk starts, the first chunk until its first image GET, the steady state, the
  finalisation, the CLI's last poll and exit), and the proxy's requests per kind (count, mean
  latency, wall span), the per-chunk dead times (chunk start -> its first image GET; its last image
  GET answered -> part written) and the fixed cost = e2e - N / scaled limit.

Numbers only: nothing is asserted. Figures: docs/performance.md, "Far storage through the CLI".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from benchmarks._common import (ROOT, Child, Queue, cpu_s, log, moto_child, photo_like_jpeg,
                                quiet_random_weights, reexec_with_malloc_tuning, s3_bucket)

SRC_BUCKET, OUT_BUCKET = "bench", "out"


# ------------------------------------------------------------------------------ the recording proxy
def serve_recording_proxy(upstream: str) -> None:
    """The proxy child: tests/faultproxy.FaultProxy whose stats also list every forwarded request
    as [method, path, t_start, t_end] (wall-clock seconds; the control requests left out)."""
    from tests.faultproxy import FaultProxy

    class RecordingProxy(FaultProxy):
        def __init__(self, up: str):
            super().__init__(up)
            self.requests_log: list[list] = []
            base = self._server.RequestHandlerClass
            rec = self.requests_log

            class Timed(base):
                def timed(self):
                    t0 = time.time()
                    try:
                        base.do_GET(self)   # the proxy's one handler for every method
                    finally:
                        if not self.path.startswith("/__fault__"):
                            rec.append([self.command, self.path, t0, time.time()])

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = timed

            self._server.RequestHandlerClass = Timed

        def stats(self) -> dict:
            return {**super().stats(), "log": list(self.requests_log)}

    proxy = RecordingProxy(upstream)
    print(f"LISTENING {proxy.url}", flush=True)
    try:
        proxy._server.serve_forever()
    finally:
        proxy._server.server_close()


def request_kind(method: str, path: str) -> str:
    """What a request to the object store is for, from its path (path-style: /bucket/key?query)."""
    p, _, q = path.partition("?")
    if method == "GET" and ("list-type" in q or p.rstrip("/") in (f"/{SRC_BUCKET}", f"/{OUT_BUCKET}")):
        return f"list {p.strip('/').split('/')[0]}"
    if p.startswith(f"/{SRC_BUCKET}/"):
        return f"image {method}"
    for word, kind in (("/inputs/", "inputs"), ("/part-", "part"), ("manifest.json", "manifest"),
                       ("job.json", "job.json"), ("/index/", "index"), ("/reused/", "reused")):
        if word in p:
            return f"{kind} {method}"
    return f"other {method} {p[:40]}"


def chunk_of(path: str, chunk_size: int) -> int | None:
    """The chunk a request belongs to: inputs/chunk-N, part-N, or an image (listing order: img/NNNNN)."""
    m = re.search(r"(?:chunk-|part-)(\d+)", path)
    if m:
        return int(m.group(1))
    m = re.search(rf"/{SRC_BUCKET}/img/(\d+)\.jpg", path)
    return int(m.group(1)) // chunk_size if m else None


# -------------------------------------------------------------------------------------------- one
def model_limit_now() -> float:
    from benchmarks.bench_engine import model_limit

    return model_limit("hardnet39ds", 32, seconds=5)


def worker_chunk_times(text: str) -> dict[int, dict[str, float]]:
    """chunk -> {'started': t, 'done': t} from the worker's log lines (Celery's '[YYYY-mm-dd
    HH:MM:SS,mmm: ...]' prefix), when its format has them."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for line in text.splitlines():
        m = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
        c = re.search(r"chunk \S+/(\d+) (?:attempt \d+ )?(started|done)", line)
        if m and c:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
            out[int(c.group(1))].setdefault(c.group(2), t)
    return out


def run_stamped(argv: list[str], env: dict[str, str]):
    """Runs argv; each line of its stdout and stderr with the wall-clock time it arrived."""
    p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    out: list[tuple[float, str]] = []
    errs: list[tuple[float, str]] = []

    def pump(stream, into):
        for line in stream:
            into.append((time.time(), line.rstrip("\n")))

    threads = [threading.Thread(target=pump, args=(p.stdout, out)),
               threading.Thread(target=pump, args=(p.stderr, errs))]
    for t in threads:
        t.start()
    p.wait(3600)
    for t in threads:
        t.join()
    return p, out, errs


def run_one(tmp: Path, a, moto, proxy: Child, limit_before: float) -> dict:
    from hnq.jobs.store import JobStore
    from producer.settings import ProducerSettings
    from tests.faultproxy import remote_set_fault, remote_stats
    from tests.servers import s3_env

    q = Queue(tmp, {"HARDNET_MODEL": "hardnet39ds", **s3_env(proxy.url)})
    try:
        env = {k: v for k, v in q.env.items() if k != "HARDNET_POLL_INTERVAL"}   # the user's default
        poll = ProducerSettings().poll_interval if "HARDNET_POLL_INTERVAL" not in os.environ else \
            float(os.environ["HARDNET_POLL_INTERVAL"])
        remote_set_fault(proxy.url, "slow", delay=a.latency_ms / 1000)
        # `hardnet` is producer.cli:main; run as a module so that it is this tree's CLI
        argv = [sys.executable, "-m", "producer.cli",
                "submit", f"s3://{SRC_BUCKET}/img/", "--out", f"s3://{OUT_BUCKET}/run{tmp.name}/",
            "--chunk-size", str(a.chunk_size), "--wait", "--json"]
        c0, w0 = moto.cpu_s() + proxy.cpu_s(), cpu_s(q.worker.proc.pid)
        ch0 = os.times()
        t0 = time.time()
        p, out, errs = run_stamped(argv, env)
        t1 = time.time()
        ch1 = os.times()
        storage_cpu = moto.cpu_s() + proxy.cpu_s() - c0
        worker_cpu = cpu_s(q.worker.proc.pid) - w0
        time.sleep(1.0)   # the purge after the end: counted, not in the user's time
        reqs = [r for r in remote_stats(proxy.url)["log"] if r[2] >= t0]
        remote_set_fault(proxy.url, "off")
        lines = [ln for _, ln in out if ln.strip()]
        if p.returncode != 0 or len(lines) < 2:
            raise RuntimeError(f"submit rc={p.returncode}: {[ln for _, ln in errs][-20:]}\n{q.worker.log()[-2000:]}")
        info = json.loads(lines[-1])
        job = info["job_id"]
        store = JobStore(q.redis.url, 1)
        done_t = store.done_times(job)
        h = store.raw(job)
        wlog = q.worker.log()
        eng = q.engine_line()
        ts = time.time()
        subprocess.run([sys.executable, "-m", "producer.cli", "status", job, "--json"], env=env, cwd=ROOT,
                       capture_output=True, timeout=120)
        status_s = time.time() - ts
    finally:
        q.stop()
    limit_after = model_limit_now()
    return dict(info=info, t0=t0, t1=t1, out=out, errs=errs, reqs=reqs, done_t=done_t, raw=h, wlog=wlog, eng=eng,
                storage_cpu=storage_cpu, worker_cpu=worker_cpu, status_s=status_s,
                cli_cpu=(ch1.children_user + ch1.children_system) - (ch0.children_user + ch0.children_system),
                limit=(limit_before + limit_after) / 2, limit_before=limit_before,
                limit_after=limit_after, poll=poll)


def report(r: dict, a) -> float:
    """Prints one run's figures and breakdown; returns the e2e ratio to the scaled limit."""
    info, t0, t1, reqs = r["info"], r["t0"], r["t1"], r["reqs"]
    n_ok, total = info["succeeded"], info["total"]
    cpus = len(os.sched_getaffinity(0))
    e2e = t1 - t0
    share = min(0.99, r["storage_cpu"] / (e2e * cpus))
    scaled = r["limit"] * (1 - share)
    sub_t, start_t, fin_t = (float(r["raw"][k]) for k in ("submitted_at", "started_at", "finished_at"))
    done_t = r["done_t"]
    last_done = max(done_t.values())
    in_worker = last_done - start_t
    rate, rate_w = n_ok / e2e, n_ok / in_worker

    log(f"\nresult: {n_ok} ok of {total}, state {info['state']}")
    log(f"model limit {r['limit_before']:.1f} before, {r['limit_after']:.1f} after: {r['limit']:.1f} img/s; "
        f"moto+proxy {r['storage_cpu']:.1f} s CPU in {e2e:.1f} s x {cpus} CPUs = {100 * share:.0f}% "
        f"-> scaled limit {scaled:.1f} img/s")
    log(f"worker CPU {r['worker_cpu']:.1f} s, CLI CPU {r['cli_cpu']:.1f} s; engine: {r['eng']}")
    dev = re.search(r"device=([\d.]+)", r["eng"])
    if dev and float(dev.group(1)) > 0:
        log(f"  the worker's own device stage: {n_ok / float(dev.group(1)):.1f} img/s while busy "
            f"(beside its decode and fetch: a reference, not the limit)")
    log(f"RESULT far_storage n={total}: e2e (submit -> --wait exit) {e2e:.2f} s = {rate:.1f} img/s = "
        f"{rate / scaled:.2f}x the scaled limit ({rate / r['limit']:.2f}x unscaled); in-worker "
        f"(first chunk started -> last part written) {in_worker:.2f} s = {rate_w:.1f} img/s = "
        f"{rate_w / scaled:.2f}x; target >= 0.75x")

    # --- requests per kind
    by = defaultdict(list)
    for m, path, a0, a1 in reqs:
        by[request_kind(m, path)].append((a0, a1, path))
    log(f"\nrequests through the proxy (+{a.latency_ms:.0f} ms each): {len(reqs)} "
        f"({len(reqs) / max(1, total):.2f} per image)")
    log(f"  {'kind':<18}{'count':>6}{'mean ms':>9}{'max ms':>8}   first..last (s after the CLI started)")
    for kind, xs in sorted(by.items(), key=lambda kv: min(x[0] for x in kv[1])):
        d = [1000 * (b - a_) for a_, b, _ in xs]
        log(f"  {kind:<18}{len(xs):>6}{sum(d) / len(d):>9.0f}{max(d):>8.0f}   "
            f"{min(x[0] for x in xs) - t0:6.2f}..{max(x[1] for x in xs) - t0:6.2f}")

    # --- the user's timeline in consecutive spans
    first_req = min((x[2] for x in reqs), default=t0)
    img = [x for x in reqs if request_kind(x[0], x[1]).startswith("image")]
    first_img = min(x[2] for x in img)
    lst = by.get(f"list {SRC_BUCKET}", [])
    inputs_put = by.get("inputs PUT", [])
    sealed_t = r["out"][0][0]                      # submit's first stdout line: the job sealed
    seen_end = r["out"][-1][0]                     # its last: the final JSON, after the last poll
    spans = [
        ("CLI start-up (python, imports, Redis/Celery connect) -> its first S3 request", first_req - t0),
        ("first S3 request -> job created in Redis (bucket check, job.json)", sub_t - first_req),
        ("job created -> first chunk started (listing, inputs PUT, message, worker takes it)", start_t - sub_t),
        ("first chunk started -> its first image GET (inputs GET, engine lease)", first_img - start_t),
        ("first image GET -> last part written (the steady state, the tail included)", last_done - first_img),
        ("last part written -> job finished (manifest, index, end state)", fin_t - last_done),
        (f"job finished -> the CLI saw it (its poll every {r['poll']:.1f} s + one read)", seen_end - fin_t),
        ("the CLI saw it -> the CLI exited (interpreter and connection teardown)", t1 - seen_end),
    ]
    log(f"\nwhere the {e2e:.2f} s go (consecutive spans):")
    for name, x in spans:
        log(f"  {x:7.2f} s {100 * x / e2e:5.1f}%  {name}")
    ideal = n_ok / scaled
    steady = last_done - first_img
    log(f"  ideal at the scaled limit: {ideal:.2f} s; the gap {e2e - ideal:.2f} s = "
        f"{e2e - steady:.2f} s outside the steady state + {steady - ideal:.2f} s inside it "
        f"(steady state {n_ok / steady:.1f} img/s = {n_ok / steady / scaled:.2f}x the scaled limit)")
    if lst and inputs_put:
        log(f"  submit: {len(lst)} LIST of the source in {max(x[1] for x in lst) - min(x[0] for x in lst):.2f} s; "
            f"{len(inputs_put)} inputs PUT (the claim check) from {min(x[0] for x in inputs_put) - t0:.2f} s "
            f"to {max(x[1] for x in inputs_put) - t0:.2f} s; job sealed {sealed_t - t0:.2f} s after the CLI "
            f"started (the worker had started {start_t - t0:.2f} s)")
    log(f"  CLI (same machine, same build): a bare `hardnet status JOB --json` takes {r['status_s']:.2f} s "
        f"start to exit")

    # --- per chunk: dead time at its start and at its end
    wt = worker_chunk_times(r["wlog"])
    per = defaultdict(lambda: {"img": []})
    for m, path, a0, a1 in reqs:
        c = chunk_of(path, a.chunk_size)
        if c is None:
            continue
        k = request_kind(m, path)
        if k.startswith("image"):
            per[c]["img"].append((a0, a1))
        else:
            per[c][k] = (a0, a1)
    heads, tails, parts_ms, inputs_ms, walls = [], [], [], [], []
    for c, d in sorted(per.items()):
        if not d["img"] or c not in done_t:
            continue
        started = wt.get(c, {}).get("started")
        if started is not None:
            heads.append(min(x[0] for x in d["img"]) - started)
            walls.append(done_t[c] - started)
        tails.append(done_t[c] - max(x[1] for x in d["img"]))
        if "part PUT" in d:
            parts_ms.append(1000 * (d["part PUT"][1] - d["part PUT"][0]))
        if "inputs GET" in d:
            inputs_ms.append(1000 * (d["inputs GET"][1] - d["inputs GET"][0]))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    log(f"\nper chunk ({len(tails)} chunks of {a.chunk_size}):")
    log(f"  inputs GET {mean(inputs_ms):.0f} ms, part PUT {mean(parts_ms):.0f} ms (mean)")
    if heads:
        log(f"  chunk started -> its first image GET: mean {1000 * mean(heads):.0f} ms, "
            f"max {1000 * max(heads):.0f} ms; chunk wall (started -> part written) mean {mean(walls):.2f} s")
    else:
        log("  (no chunk start times in the worker's log: its line format has no timestamp)")
    log(f"  last image GET answered -> part written (decode + model still queued for it, part PUT, Redis): mean {1000 * mean(tails):.0f} ms, max {1000 * max(tails):.0f} ms")
    starts = sorted(v["started"] for v in wt.values() if "started" in v)
    ends = sorted(done_t.values())
    if starts:
        # chunks in flight over time: how much the per-chunk fixed costs overlap
        ev = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
        cur, acc, last = 0, 0.0, ev[0][0]
        for t, dlt in ev:
            acc += cur * (t - last)
            cur, last = cur + dlt, t
        log(f"  chunks in flight on average (first start -> last part): {acc / max(1e-9, ends[-1] - starts[0]):.2f}")
    img_busy = sorted(img, key=lambda x: x[2])
    gaps, end_so_far = 0.0, img_busy[0][3]
    for m, path, a0, a1 in img_busy[1:]:
        if a0 > end_so_far:
            gaps += a0 - end_so_far
        end_so_far = max(end_so_far, a1)
    log(f"  image GETs: {len(img)} from {first_img - t0:.2f} s to {max(x[3] for x in img) - t0:.2f} s; "
        f"no image GET in flight for {gaps:.2f} s of that span")
    return rate / scaled


def main() -> None:
    if sys.argv[1:2] == ["--proxy-child"]:
        serve_recording_proxy(sys.argv[2])
        return
    reexec_with_malloc_tuning(cpu_worker=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192, help="images (the issue's figures: 192 and 768)")
    ap.add_argument("--latency-ms", type=float, default=80, help="added to every request to the store")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    quiet_random_weights()
    import torch

    log(f"bench_far_storage {datetime.now().isoformat(timespec='seconds')}  python "
        f"{platform.python_version()}, torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs, "
        f"load {os.getloadavg()}")
    log(f"hardnet39ds (random weights, CPU), {a.n} JPEGs 500x375, --chunk-size {a.chunk_size}, "
        f"+{a.latency_ms:.0f} ms on every request to moto's S3")
    moto = moto_child()
    proxy = Child([sys.executable, "-m", "benchmarks.bench_far_storage", "--proxy-child", moto.url])
    ratios = []
    try:
        s3_bucket(moto.url, SRC_BUCKET, [(f"img/{i:05d}.jpg", photo_like_jpeg(500, 375, seed=i))
                                         for i in range(a.n)])
        s3_bucket(moto.url, OUT_BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench_far_") as d:
            limit = model_limit_now()
            for rep in range(a.repeat):
                log(f"\n== run {rep + 1} of {a.repeat} (load {os.getloadavg()})")
                r = run_one(Path(d) / str(rep), a, moto, proxy, limit)
                limit = r["limit_after"]
                ratios.append(report(r, a))
    finally:
        proxy.stop()
        moto.stop()
    log(f"\nRESULT far_storage: e2e/scaled limit {', '.join(f'{x:.2f}x' for x in ratios)}; "
        f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
