"""The GPU benchmark table (run by scripts/gpu_check.sh on a lent H100/H200; rehearsed on the CPU
with small sizes: `--device cpu --quick`).

    python benchmarks/bench_gpu.py [--device cuda] [--n-e2e 20000] [--models hardnet68,hardnet39ds]
                                   [--no-compile] [--quick] [--out FILE]

Rows, each measured in this run:
  model limit    DeviceRunner (pinned host batch -> side-stream copy -> fp16 channels_last forward ->
                 top-5 on the device -> small D2H copy), two batches in flight, batch 256:
                 eager / torch.compile / CUDA graphs, per model.
  decode limit   decode_image on all allowed CPU cores (threads), with the worker's torch intra-op
                 threads (1 on a GPU) and then torch's default; GpuDecoder.decode_batch (nvJPEG)
                 at batch 256; over the same generated 500x375 JPEGs.
  end to end     `hardnet submit DIR --out DIR --wait` over --n-e2e generated JPEGs through a real
                 redis-server and one `hardnet worker` (hardnet68, HARDNET_DECODE=cpu, then gpu).
  naive worker   benchmarks/naive_worker.py: one Celery task per image (PIL, batch 1, fp32).
Targets (issue 7): end to end >= 0.7 x min(model limit, decode limit) and >= 10 x the naive worker;
the aim is >= 10,000 img/s end to end for hardnet68 on one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

from _common import ROOT, photo_like_jpeg

LINES: list[str] = []


def out(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def _gen(args) -> None:
    path, seed = args
    Path(path).write_bytes(photo_like_jpeg(500, 375, seed=seed))


def make_images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"img{i:06d}.jpg" for i in range(n)]
    todo = [(str(p), i) for i, p in enumerate(paths) if not p.exists()]
    from worker.engine import allowed_cpus

    with Pool(allowed_cpus()) as pool:
        pool.map(_gen, todo, chunksize=64)
    return paths


def model_limit(model: str, device, batch: int, mode: str, seconds: float) -> float | str:
    import torch

    from worker.engine import DeviceRunner
    from worker.engine.classifier import Classifier

    clf = Classifier(model, "random", device=str(device), batch_size=batch)
    try:
        r = DeviceRunner(clf.net, clf.device, batch, amp=clf.amp, compile=mode == "compiled",
                         cuda_graphs=mode == "graphs")
        r.warm_up()
    except Exception as e:  # noqa: BLE001 - a row that could not run says why
        return f"failed: {type(e).__name__}: {str(e)[:80]}"
    imgs = list(torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8))
    r.finish(r.launch(imgs))
    n, t0, prev = 0, time.perf_counter(), None
    while time.perf_counter() - t0 < seconds:
        p = r.launch(imgs)
        if prev is not None:
            r.finish(prev)
            n += batch
        prev = p
    r.finish(prev)
    n += batch
    return n / (time.perf_counter() - t0)


def decode_limits(blobs: list[bytes], device, batch: int) -> dict[str, float | str]:
    from worker.engine import allowed_cpus
    from worker.image.decode import decode_image

    import torch

    from worker.engine.cpus import intra_op_threads

    res: dict[str, float | str] = {}
    th = allowed_cpus()
    own = torch.get_num_threads()
    # First as the worker runs it (its intra-op rule, HARDNET_TORCH_THREADS=0): the limit the end
    # to end row is held to; then with torch's default, for the difference.
    worker_n = intra_op_threads(device.type) or own
    variants = [(worker_n, "the worker's")] + ([(own, "torch's default")] if own != worker_n else [])
    for n, what in variants:
        torch.set_num_threads(n)
        with ThreadPoolExecutor(th) as ex:          # fresh threads: OpenMP teams of n
            list(ex.map(decode_image, blobs[:64]))
            t0 = time.perf_counter()
            list(ex.map(decode_image, blobs))
            res[f"CPU decode_image, {th} threads, {n} intra-op ({what})"] = \
                len(blobs) / (time.perf_counter() - t0)
    torch.set_num_threads(own)
    if device.type == "cuda":
        try:
            from worker.image.gpu_decode import GpuDecoder

            g = GpuDecoder(device, max_pixels=89_478_485, cpu_decode=decode_image)
            g.decode_batch(blobs[:batch])
            t0 = time.perf_counter()
            for i in range(0, len(blobs), batch):
                g.decode_batch(blobs[i:i + batch])
            res[f"GPU nvJPEG decode_batch, batch {batch}"] = len(blobs) / (time.perf_counter() - t0)
            res["(GPU decoder stats)"] = json.dumps(g.stats)
        except Exception as e:  # noqa: BLE001
            res[f"GPU nvJPEG decode_batch, batch {batch}"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
    return res


def _env(redis_url: str, tmp: Path, device: str, extra: dict) -> dict:
    env = dict(os.environ)
    env.update({"HARDNET_BROKER_URL": redis_url, "HARDNET_WEIGHTS": "random", "HARDNET_DEVICE": device,
                "HARDNET_FILE_ROOTS": str(tmp), "HARDNET_OUTPUT_ROOTS": str(tmp),
                "HARDNET_STATE_DIR": str(tmp / "state"), "HARDNET_POLL_INTERVAL": "0.2",
                "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    env.update(extra)
    return env


def end_to_end(tmp: Path, img_dir: Path, n: int, device: str, model: str, decode: str,
               timeout: float) -> tuple[float | str, str]:
    from cluster import Worker
    from servers import RedisServer

    redis = RedisServer(tmp / f"redis-{decode}").start()
    env = _env(redis.url, tmp, device, {"HARDNET_MODEL": model, "HARDNET_DECODE": decode})
    w = Worker(env, f"e2e-{decode}", tmp)
    try:
        w.wait_ready(timeout=300)
        p = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(img_dir), "--out",
                            str(tmp / f"out-{decode}"), "--wait", "--json", "--timeout", str(int(timeout))],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 60)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        eng = [ln.split("engine:")[1].strip() for ln in w.log().splitlines() if "engine:" in ln][-1:]
        if not lines:
            return f"failed rc={p.returncode}: {p.stderr[-200:]}", ""
        info = json.loads(lines[-1])
        if not info.get("finished_at"):
            return f"not finished: {info.get('state')} {info.get('succeeded')}/{info.get('total')}", ""
        job_s = (datetime.fromisoformat(info["finished_at"])
                 - datetime.fromisoformat(info["submitted_at"])).total_seconds()
        return info["succeeded"] / job_s, (eng[0] if eng else "")
    finally:
        w.stop()
        redis.stop()


def naive(tmp: Path, paths: list[Path], device: str, model: str, seconds: float) -> float | str:
    from servers import RedisServer

    redis = RedisServer(tmp / "redis-naive").start()
    env = _env(redis.url, tmp, device, {"NAIVE_MODEL": model, "NAIVE_DEVICE": device})
    log = open(tmp / "naive.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "naive_worker", "worker", "--pool=solo",
                             "-Q", "naive", "--loglevel=WARNING", "--without-gossip", "--without-mingle"],
                            env=env, cwd=ROOT / "benchmarks", stdout=log, stderr=subprocess.STDOUT)
    try:
        import redis as redis_py

        sys.path.insert(0, str(ROOT / "benchmarks"))
        os.environ["HARDNET_BROKER_URL"] = redis.url
        import naive_worker

        naive_worker.app.conf.broker_url = redis.url
        r = redis_py.Redis.from_url(redis.url)
        with naive_worker.app.producer_or_acquire() as prod:
            for p in paths:
                naive_worker.label.apply_async(args=[str(p)], producer=prod)
        deadline = time.monotonic() + 300
        while int(r.get("naive:done") or 0) < 5:    # model loaded, first images through
            if proc.poll() is not None or time.monotonic() > deadline:
                return f"failed: {(tmp / 'naive.log').read_text()[-300:]}"
            time.sleep(0.2)
        d0, t0 = int(r.get("naive:done") or 0), time.monotonic()
        time.sleep(seconds)
        return (int(r.get("naive:done") or 0) - d0) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        redis.stop()


def fmt(v) -> str:
    return f"{v:10.0f}" if isinstance(v, float) else f"{v}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="hardnet68,hardnet39ds")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-e2e", type=int, default=20_000)
    ap.add_argument("--n-decode", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0, help="per model-limit row")
    ap.add_argument("--naive-seconds", type=float, default=20.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-models", default="hardnet68",
                    help="models whose compiled row runs (compiling takes a minute or more each)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a rehearsal on the CPU")
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()
    if a.quick:
        a.n_e2e, a.n_decode, a.seconds, a.naive_seconds, a.batch = 128, 64, 2.0, 5.0, 16
    import warnings

    warnings.filterwarnings("ignore", message=".*RANDOM, untrained weights.*")
    import torch

    device = torch.device(a.device)
    models = [m for m in a.models.split(",") if m]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out(f"bench_gpu {datetime.now().isoformat(timespec='seconds')} on {name}; torch {torch.__version__}; "
        f"{len(os.sched_getaffinity(0))} CPUs; batch {a.batch}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    t_start = time.monotonic()

    out("\n| row | img/s |\n|---|---|")
    limits: dict[str, float] = {}
    for m in models:
        for mode in ("eager", "compiled", "graphs"):
            if mode == "compiled" and (a.no_compile or m not in a.compile_models.split(",")) \
                    or mode == "graphs" and device.type != "cuda":
                continue
            t0 = time.monotonic()
            v = model_limit(m, device, a.batch, mode, a.seconds)
            out(f"| model limit {m} {mode} (incl. setup {time.monotonic() - t0:.0f}s) | {fmt(v)} |")
            if isinstance(v, float):
                limits[m] = max(limits.get(m, 0.0), v)
    t0 = time.monotonic()
    e2e_dir = tmp / "images"
    paths = make_images(e2e_dir, max(a.n_e2e, a.n_decode))
    out(f"| (generated {len(paths)} JPEGs 500x375 in {time.monotonic() - t0:.0f}s) | |")
    blobs = [p.read_bytes() for p in paths[:a.n_decode]]
    dec = decode_limits(blobs, device, a.batch)
    for k, v in dec.items():
        out(f"| decode limit {k} | {fmt(v)} |")
    if len(paths) > a.n_e2e:
        for p in paths[a.n_e2e:]:
            p.unlink()
    e2e: dict[str, float] = {}
    for mode in (("cpu", "gpu") if device.type == "cuda" else ("cpu",)):
        v, eng = end_to_end(tmp, e2e_dir, a.n_e2e, a.device, models[0], mode, timeout=240)
        out(f"| end to end {models[0]}, {a.n_e2e} JPEGs, HARDNET_DECODE={mode} | {fmt(v)} |")
        if eng:
            out(f"|   worker: {eng} | |")
        if isinstance(v, float):
            e2e[mode] = v
    nv = naive(tmp, paths[:2000], a.device, models[0], a.naive_seconds)
    out(f"| naive one-task-per-image Celery worker ({models[0]}, PIL, batch 1, fp32) | {fmt(nv)} |")

    out("")
    m0 = models[0]
    dec_limits = {"cpu": next((v for k, v in dec.items() if k.startswith("CPU") and isinstance(v, float)), None),
                  "gpu": next((v for k, v in dec.items() if k.startswith("GPU") and isinstance(v, float)), None)}
    for mode, v in e2e.items():
        lim = [x for x in (limits.get(m0), dec_limits.get(mode)) if x]
        if lim:
            out(f"end to end (decode={mode}) / min(model limit, decode limit) = {v:.0f} / {min(lim):.0f} "
                f"= {v / min(lim):.2f}x (target >= 0.7x)")
        if isinstance(nv, float) and nv > 0:
            out(f"end to end (decode={mode}) / naive worker = {v / nv:.1f}x (target >= 10x)")
    out(f"total time {time.monotonic() - t_start:.0f}s")
    if a.out:
        Path(a.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main()
