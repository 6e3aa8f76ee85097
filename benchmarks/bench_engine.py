"""The streaming engine against its limits, measured in the same run (issue 7's figures).

    python -m benchmarks.bench_engine [--scenarios default68,latency39,plumbing,ceiling,rss] [--n-latency 1024]

Scenarios (each prints its figures and its ratio to a baseline measured in the same run):

default68  hardnet68 with the worker's default settings (batch from the device, chunk 256,
           4 chunks in flight), N local JPEGs through the queue: `hardnet submit DIR --wait` to a
           real redis-server and one `hardnet worker` process. Baseline: the model limit, i.e.
           `Classifier.predict` on pre-decoded uint8 batches of the same size in this process
           (normalise + forward + softmax/top-5), measured before and after the job (mean).
latency39  hardnet39ds, `--chunk-size 16`, images in moto's S3 server behind the fault proxy
           adding 80 ms to every request (a distant object store), both in child processes; a
           fresh worker per job, each --latency-variants setting (default: the worker's defaults
           against `fixed4`, 4 chunks in flight whatever their size) --repeat times, interleaved.
           Baseline: the model limit as above, measured right before and after each job (a
           shared VM's speed drifts within minutes; figures:
           docs/performance.md#against-its-limits-benchmarksbench_enginepy). On 2 cores moto and the proxy
           burn CPU the worker then lacks: their CPU time during the job is read from /proc, and
           the limit is scaled down by their share of the machine (limit x (1 - share)).
plumbing   the same engine in this process with a zero-cost stand-in for what the model limit
           measures (normalise + forward + softmax/top-k: benchmarks/_common.zero_cost_runner):
           end-to-end images/s over --n-plumbing images (a stream long enough for the steady
           state) against the decode-only rate of the same cores (decode_image over the same
           bytes in as many threads).
ceiling    the engine's own cost per image, as on a GPU worker (batch 256, a decode thread per
           core): fetch hands back a constant blob, decode a constant image, the device stage
           stacks each batch into a preallocated buffer and returns a constant top-5
           (benchmarks/_common.StackingRunner); the records are the worker's. Images/s, process CPU
           and context switches per image over --n-ceiling images, for each of --ceiling-variants
           (default: at most 256 fetch threads, a GPU worker's default, started on demand; 256
           started at once; 256 on demand with Python's own GC threshold of 700 instead of the
           engine's HARDNET_GC_THRESHOLD; both, the engine before either change), interleaved,
           against the
           decode-only rate of the same cores (as in plumbing): how far the engine itself is from
           being the bottleneck.
rss        a worker (hardnet39ds) labels 20,000 URIs (a list cycling over the generated files);
           its RSS is sampled every second; growth after the first 2,000 images (warm-up) is
           reported as (max - value at warm-up) / value at warm-up.

Images: generated photo-like JPEGs at 500x375 (quality 90). Weights: `random` (the deterministic
fill: the compute of the real weights). The process re-executes itself with the glibc malloc
thresholds that `hardnet worker` uses, so both sides run under the same allocator settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from benchmarks._common import (ROOT, Meter, Queue, StackingRunner, cpu_s, log, median_hi, moto_child,
                                photo_like_jpeg, proc_rss_mb, proxy_child, quiet_random_weights,
                                reexec_with_malloc_tuning, rerun_argv, s3_bucket, write_jpegs,
                                zero_cost_engine)

# torch and the worker's modules are imported inside the functions: main() re-executes this
# process under the worker's malloc settings first, and each scenario loads only what it uses.


def model_limit(model: str, batch: int, seconds: float = 8.0) -> float:
    """images/s of the model alone on pre-decoded uint8 batches in this process's main thread
    (normalise + forward + softmax/top-k, the worker's DeviceRunner), the better of the eager and
    the TorchScript-traced forward (the worker's CPU default), alternated batch by batch so that
    both see the same machine; after a warm-up batch of each."""
    import torch

    from worker.engine import DeviceRunner
    from worker.image.decode import decode_image
    from worker.engine.classifier import Classifier

    clf = Classifier(model, "random", device="cpu", batch_size=batch)
    imgs = [decode_image(photo_like_jpeg(500, 375, seed=10_000 + i)) for i in range(batch)]
    from hnq.options import TOP_K_MAX

    runners = [DeviceRunner(clf.net, torch.device("cpu"), batch, amp=False, k=TOP_K_MAX, torchscript=ts)
               for ts in ("off", "on")]
    spent = [0.0, 0.0]
    for r in runners:
        r.finish(r.launch(imgs))
    n, t_end = 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end or n < 2:
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            r.finish(r.launch(imgs))
            spent[i] += time.perf_counter() - t0
        n += 1
    return max(n * batch / t for t in spent)


def scenario_default68(tmp: Path, a) -> None:
    log(f"\n== default68: hardnet68, default worker settings, {a.n_default} local JPEGs through the queue")
    write_jpegs(tmp / "d68", a.n_default)
    import torch

    from worker.engine import default_batch_size

    batch = default_batch_size(torch.device("cpu"))   # what the worker picks on the CPU
    before = model_limit("hardnet68", batch)
    log(f"model limit before: {before:.1f} img/s (batch {batch})")
    q = Queue(tmp, {"HARDNET_MODEL": "hardnet68", "HARDNET_FILE_ROOTS": str(tmp / "d68")})
    try:
        info = q.submit([str(tmp / "d68")])
        eng = q.engine_line()
    finally:
        q.stop()
    after = model_limit("hardnet68", batch)
    limit = (before + after) / 2
    rate = info["succeeded"] / info["job_s"]
    log(f"model limit after: {after:.1f} img/s")
    log(f"end to end: {info['succeeded']} ok of {info['total']} in {info['job_s']:.1f}s = {rate:.1f} img/s")
    log(f"  worker: {eng}")
    log(f"RESULT default68: {rate:.1f} img/s / model limit {limit:.1f} = {rate / limit:.2f}x (target >= 0.85x)")


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    """'default;fixed4:HARDNET_MAX_CHUNKS_IN_FLIGHT=4,HARDNET_X=1' -> [(name, worker env), ...]"""
    out = []
    for part in [p.strip() for p in spec.split(";") if p.strip()]:
        name, _, envs = part.partition(":")
        out.append((name, dict(kv.split("=", 1) for kv in envs.split(",") if kv)))
    return out


def scenario_latency39(tmp: Path, a) -> None:
    n = a.n_latency
    log(f"\n== latency39: hardnet39ds, chunk 16, {n} JPEGs in moto S3 behind +{a.latency_ms} ms per request")
    from tests.faultproxy import remote_set_fault
    from tests.servers import s3_env

    variants = parse_variants(a.latency_variants)
    moto = moto_child()
    proxy = proxy_child(moto.url)
    cpus = len(os.sched_getaffinity(0))
    results: dict[str, list[float]] = {name: [] for name, _ in variants}
    try:
        s3_bucket(moto.url, "bench", [(f"img/{i:05d}.jpg", photo_like_jpeg(500, 375, seed=i)) for i in range(n)])
        remote_set_fault(proxy.url, "slow", delay=a.latency_ms / 1000)

        # This machine's speed drifts (a shared VM): the model limit is measured right before and
        # right after every job, and each job is set against the mean of those two.
        limit_prev = model_limit("hardnet39ds", 32, seconds=5)
        log(f"model limit at the start: {limit_prev:.1f} img/s (batch 32)")
        for r in range(a.repeat):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, extra in order:
                q = Queue(tmp / f"{name}-{r}", {"HARDNET_MODEL": "hardnet39ds", **s3_env(proxy.url), **extra})
                try:
                    c0 = moto.cpu_s() + proxy.cpu_s()
                    w0 = cpu_s(q.worker.proc.pid)
                    t0 = time.perf_counter()
                    info = q.submit(["s3://bench/img/", "--chunk-size", "16"])
                    wall = time.perf_counter() - t0
                    storage_cpu = moto.cpu_s() + proxy.cpu_s() - c0
                    worker_cpu = cpu_s(q.worker.proc.pid) - w0
                    eng = q.engine_line()
                finally:
                    q.stop()
                limit_next = model_limit("hardnet39ds", 32, seconds=5)
                limit = (limit_prev + limit_next) / 2
                limit_prev = limit_next
                share = min(0.99, storage_cpu / (wall * cpus))
                scaled = limit * (1 - share)
                rate = info["succeeded"] / info["job_s"]
                results[name].append(rate / scaled)
                log(f"{name} (repeat {r + 1}{', ' + ','.join(f'{k}={v}' for k, v in extra.items()) if extra else ''}): "
                    f"{info['succeeded']} ok of {info['total']} in {info['job_s']:.1f}s = {rate:.1f} img/s; "
                    f"model limit around it {limit:.1f}, scaled by the emulators' share ({100 * share:.0f}% of "
                    f"the machine) {scaled:.1f}: {rate / limit:.2f}x / {rate / scaled:.2f}x scaled")
                log(f"  worker: {eng}; CPU {worker_cpu:.1f}s, "
                    f"moto+proxy {storage_cpu:.1f}s in {wall:.1f}s x {cpus} CPUs")
    finally:
        proxy.stop()
        moto.stop()
    for name, ratios in results.items():
        rs = sorted(ratios)
        log(f"RESULT latency39 {name}: median {median_hi(rs):.2f}x the model limit scaled by the "
            f"emulators' share (min {rs[0]:.2f}, max {rs[-1]:.2f}, {len(rs)} jobs; target >= 0.75x)")


def decode_only_rate(blobs: list[bytes], threads: int) -> float:
    """images/s of decode_image alone over blobs in `threads` threads: what the same cores can
    decode, the baseline of plumbing and ceiling."""
    from worker.image.decode import decode_image

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(decode_image, blobs))
    return len(blobs) / (time.perf_counter() - t0)


def scenario_plumbing(tmp: Path, a) -> None:
    n = a.n_plumbing
    uniq = min(n, 512)
    log(f"\n== plumbing: the engine with a zero-cost device stage vs decode-only, {n} JPEGs "
        f"({uniq} files, cycled) from file://")
    from hnq.storage import FetchPolicy
    from hnq.uris import path_to_file_uri
    from worker.engine import allowed_cpus
    from worker.engine.classifier import Classifier

    files = write_jpegs(tmp / "plumb", uniq)
    paths = [files[i % uniq] for i in range(n)]
    blobs = [p.read_bytes() for p in paths]
    uris = [path_to_file_uri(p) for p in paths]
    threads = allowed_cpus()
    clf = Classifier("hardnet39ds", "random", device="cpu", batch_size=32)
    eng = zero_cost_engine(clf, FetchPolicy(file_roots=(str(tmp / "plumb"),)))
    try:
        rows = []
        for r in range(a.repeat):
            dec = decode_only_rate(blobs, threads)
            with Meter() as m:
                chunks = [eng.submit(uris[i:i + 256]) for i in range(0, n, 256)]
                recs = [x for c in chunks for x in c.result()]
            e2e, us, sw = n / m.wall, 1e6 * m.cpu / n, m.switches / n
            assert all(x.status == "ok" for x in recs), [x for x in recs if x.status != "ok"][:1]
            rows.append((dec, e2e, us, sw))
            log(f"  repeat {r + 1}: decode-only {dec:.0f} img/s, engine end to end {e2e:.0f} img/s, "
                f"ratio {e2e / dec:.2f}; engine {us:.0f} us CPU and {sw:.2f} context switches per image")
        log(f"  {eng.summary()}")
    finally:
        eng.close()
    ratios = sorted(e / d for d, e, _, _ in rows)
    med = median_hi(ratios)
    us = median_hi([r[2] for r in rows])
    sw = median_hi([r[3] for r in rows])
    log(f"RESULT plumbing ({threads} decode threads): median ratio engine/decode-only = {med:.2f}x "
        f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f}; target >= 0.85x); engine median {us:.0f} us CPU "
        f"and {sw:.2f} context switches per image")


def parse_ceiling_variant(v: str) -> tuple[int, int | None, int | None]:
    """"FT[:gcN][:all]" -> (most fetch threads, GC threshold or None, fetch threads started at
    once: FT with ":all" (all of them, as before the stage grew on demand), else None)."""
    ft, *opts = v.split(":")
    g = first = None
    for o in opts:
        if o.startswith("gc"):
            g = int(o[2:])
        elif o == "all":
            first = int(ft)
        else:
            raise SystemExit(f"ceiling variant {v!r}: unknown option {o!r}")
    return int(ft), g, first


def ceiling_one(variant: str, n: int) -> dict:
    """One ceiling measurement in this (fresh) process, as a worker has it: one engine."""
    import gc

    import torch

    from hnq.storage import Fetched
    from worker.engine import Engine, EngineConfig, allowed_cpus
    from worker.engine.fetch import FIRST_THREADS
    from worker.engine.classifier import Classifier

    ft, g, first = parse_ceiling_variant(variant)
    batch = 256
    clf = Classifier("hardnet39ds", "random", device="cpu", batch_size=batch)
    image = torch.zeros((3, 224, 224), dtype=torch.uint8)
    blob = photo_like_jpeg(500, 375, seed=1)
    got = Fetched(data=blob, etag='"0123456789abcdef"', size=len(blob))
    eng = Engine(fetch=lambda uri: got, decode=lambda data: image, runner=StackingRunner(batch),
                 record=clf.record, cfg=EngineConfig(batch_size=batch, fetch_threads=ft,
                                                     first_fetch_threads=first or FIRST_THREADS,
                                                     decode_threads=allowed_cpus()))
    if g:
        gc.set_threshold(g, *gc.get_threshold()[1:])
    uris = [f"s3://bench-bucket/images/{i:08d}.jpg" for i in range(n)]
    try:
        for m in (2048, n):      # a warm-up run, then the measured one
            with Meter() as meter:
                chunks = [eng.submit(uris[i:i + 512], job_id="bench") for i in range(0, m, 512)]
                recs = [x for c in chunks for x in c.result()]
            assert len(recs) == m and all(x.status == "ok" for x in recs)
            del recs, chunks
        return {"rate": n / meter.wall, "us": 1e6 * meter.cpu / n, "gc": gc.get_threshold()[0],
                "threads": eng.fetcher.threads, "switches": meter.switches / n, "summary": eng.summary()}
    finally:
        eng.close()


def scenario_ceiling(tmp: Path, a) -> None:
    n = a.n_ceiling
    variants = [x.strip() for x in a.ceiling_variants.split(",") if x.strip()]
    log(f"\n== ceiling: the engine with zero-cost fetch, decode and device stages, {n} images, "
        f"batch 256, variants {variants} (fetch threads[:gc threshold][:all started]), each measurement in a "
        "fresh process (one engine, as in a worker), interleaved")
    from worker.engine import allowed_cpus

    blobs = [p.read_bytes() for p in write_jpegs(tmp / "ceil", 256)]
    blobs = [blobs[i % len(blobs)] for i in range(2048)]
    threads = allowed_cpus()
    rows: dict[str, list] = {v: [] for v in variants}
    decs = []
    for r in range(a.repeat):
        decs.append(decode_only_rate(blobs, threads))
        log(f"  repeat {r + 1}: decode-only {decs[-1]:.0f} img/s")
        for v in variants:
            p = subprocess.run([*rerun_argv(), "--ceiling-one", v, "--n-ceiling", str(n)],
                               capture_output=True, text=True, timeout=600, cwd=ROOT,
                               env={k: x for k, x in os.environ.items() if k != "MALLOC_ARENA_MAX"})
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                log(f"    {v:>10}: failed rc={p.returncode}: {p.stderr[-500:]}")
                continue
            m = json.loads(lines[-1])
            rows[v].append(m)
            log(f"    {v:>11}: {m['rate']:.0f} img/s, {m['us']:.0f} us CPU and {m['switches']:.2f} "
                f"context switches per image (GC threshold {m['gc']}, {m['threads']} fetch threads started)")
    for v in variants:
        if rows[v]:
            log(f"  {v}, last run: {rows[v][-1]['summary']}")
    dec = median_hi(decs)
    for v in variants:
        if not rows[v]:
            continue
        med = {k: median_hi([m[k] for m in rows[v]]) for k in ("rate", "us", "switches")}
        log(f"RESULT ceiling {v} ({threads} CPUs, GC threshold {rows[v][0]['gc']}, "
            f"{rows[v][-1]['threads']} fetch threads started): "
            f"median {med['rate']:.0f} img/s, {med['us']:.0f} us CPU and {med['switches']:.2f} context "
            f"switches per image; {med['rate'] / dec:.1f}x the decode-only rate of these cores "
            f"({dec:.0f} img/s, median); at 10,000 img/s the engine alone would take "
            f"{med['us'] * 1e4 / 1e6:.1f} cores of CPU")


def scenario_rss(tmp: Path, a) -> None:
    n, uniq = a.n_rss, 512
    log(f"\n== rss: a worker (hardnet39ds) over {n} URIs; RSS sampled every second")
    paths = write_jpegs(tmp / "rss", uniq)
    listing = tmp / "rss.txt"
    # the same files many times over: a job may list a URI more than once (one record each)
    with listing.open("w") as f:
        for i in range(n):
            f.write(f"{paths[i % uniq]}\n")
    q = Queue(tmp, {"HARDNET_MODEL": "hardnet39ds", "HARDNET_FILE_ROOTS": str(tmp / "rss")})
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        from hnq.jobs.store import JobStore

        store = JobStore(q.env["HARDNET_BROKER_URL"])
        while not stop.is_set():
            try:
                ids = store.recent(1)
                done = 0
                if ids:
                    info = store.info(ids[0])
                    done = info.succeeded + info.failed if info else 0
                samples.append((done, proc_rss_mb(q.worker.proc.pid)))
            except Exception:  # noqa: BLE001
                pass
            stop.wait(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        info = q.submit(["--from-file", str(listing)], timeout=3600)
    finally:
        stop.set()
        th.join(5)
        q.stop()
    warm = [rss for done, rss in samples if done >= 2000]
    if not warm:
        log("RESULT rss: no samples after warm-up")
        return
    base, top, low = warm[0], max(warm), min(warm)
    log(f"images {info['succeeded']} ok in {info['job_s']:.0f}s; RSS at 2,000 images {base:.0f} MiB, "
        f"then min {low:.0f} / max {top:.0f} / last {warm[-1]:.0f} MiB over {len(warm)} samples")
    log(f"RESULT rss: growth after warm-up {100 * (top - base) / base:+.1f}% (max), "
        f"{100 * (warm[-1] - base) / base:+.1f}% (last) (target within +-5%)")


SCENARIOS = {"default68": scenario_default68, "latency39": scenario_latency39,
             "plumbing": scenario_plumbing, "ceiling": scenario_ceiling, "rss": scenario_rss}


def main() -> None:
    # `plumbing` and `ceiling` measure the engine's own overhead, which matters on a GPU worker: they
    # run with glibc's arenas as a GPU worker does (child processes: plumbing's one when other
    # scenarios run too, ceiling's one per measurement).
    alone = "--plumbing-child" in sys.argv or "--ceiling-one" in sys.argv
    reexec_with_malloc_tuning(cpu_worker=not alone)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="default68,latency39,plumbing")
    ap.add_argument("--n-default", type=int, default=384)
    ap.add_argument("--n-latency", type=int, default=1024)
    ap.add_argument("--latency-ms", type=float, default=80)
    ap.add_argument("--latency-variants", default="default;fixed4:HARDNET_MAX_CHUNKS_IN_FLIGHT=4",
                    help="worker settings compared by latency39, ';'-separated NAME[:ENV=V,ENV=V]; "
                    "fixed4 = 4 chunks in flight whatever their size (the behaviour before admission by images)")
    ap.add_argument("--n-plumbing", type=int, default=4096)
    ap.add_argument("--n-ceiling", type=int, default=20_000)
    ap.add_argument("--ceiling-variants", default="256,256:all,256:gc700,256:all:gc700",
                    help="compared by ceiling: FT[:gcN][:all] = most fetch threads (256: a GPU worker's "
                    "default) [Python's first GC threshold during the run instead of the engine's; "
                    "700 is Python's own] [all FT started at once instead of on demand]")
    ap.add_argument("--n-rss", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plumbing-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ceiling-one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    quiet_random_weights()
    if a.ceiling_one:
        print(json.dumps(ceiling_one(a.ceiling_one, a.n_ceiling)), flush=True)
        return
    import torch

    log(f"bench_engine {datetime.now().isoformat(timespec='seconds')}  python {platform.python_version()}, "
        f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as d:
        for name in [x.strip() for x in a.scenarios.split(",") if x.strip()]:
            if name == "plumbing" and not a.plumbing_child:
                sys.stdout.flush()
                subprocess.run([*rerun_argv(), "--scenarios", name, "--plumbing-child",
                                "--n-plumbing", str(a.n_plumbing), "--repeat", str(a.repeat)], cwd=ROOT,
                               env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"})
                continue
            sub = Path(d) / name
            sub.mkdir()
            SCENARIOS[name](sub, a)
    log(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
