"""images/s of labelling the same N images: a home-made script vs our pipeline (vs the queue).

    python -m benchmarks.bench_pipeline [--n 64] [--model hardnet39ds] [--batch-size 16]
                                        [--threads T] [--repeat 4] [--s3] [--queue]

Inputs: N generated photo-like JPEGs (smooth gradients + edges + sensor-like noise, quality 90),
3 of every 4 at 500x375 and 1 at 1024x768, written to a temp dir and read as ``file://`` URIs, or,
with ``--s3``, uploaded to moto's S3 server (``tests/servers.MotoS3``, run in a child process so
that it does not share our GIL) and read as ``s3://`` URIs. Weights: ``random`` (the deterministic
fill: same compute as the real weights, no download).

Modes, all on the same model instance (CPU unless --device; on CUDA, (c) uses the Classifier's
fp16 autocast + channels_last while the home-made baselines run plain fp32, as such a script
would), timed over all N images:

(a) home-made script: for each image in turn: read the bytes, PIL open + torchvision reference
    transform (``reference_preprocess``: Resize(256)/CenterCrop(224)/ToTensor/Normalize), forward
    with batch 1 under ``torch.no_grad()``, softmax, top-5;
(b) same, batched: PIL reference transform one image at a time, forward in batches of B;
(c) ours: ``Classifier`` + the worker's streaming engine (``worker.engine``: fetch threads,
    decode threads, batches of B across chunks, normalised "on the device"), fed chunks of
    ``--chunk-size`` URIs like a worker; records built as a worker builds them.

and, to show the bottleneck: the PIL reference preprocessing alone and our decode alone
(``decode_image``), both on the bytes already in memory, one image at a time; our fetch+decode
alone (the engine with a zero-cost stand-in for the model); our model alone
(``Classifier.predict`` on pre-decoded uint8 batches of B: normalise + forward + softmax/top-5 +
labels).

Every repeat runs every mode once (the order rotates between repeats); the table gives the
median over repeats (images/s, ms/image) and the min..max, and each ratio is the median of the
per-repeat ratios (paired, so slow drift from other load on the machine cancels out to first
order), plus the ratio of the best runs. "CPU ms/img" is the user+sys CPU time of this process
(all its threads) per image: less sensitive than wall time to other work on the machine, but
OpenMP threads that spin while waiting for a descheduled sibling inflate it on shared cores.

(d) ``--queue``: end to end through the queue: a throwaway redis-server (``tests/servers.RedisServer``),
one worker subprocess (``python -m producer.cli worker``, same model/batch/threads,
HARDNET_WEIGHTS=random, HARDNET_FILE_ROOTS=the temp dir), then per repeat ``hardnet submit DIR
--wait --json`` (or the s3:// prefix); images/s = N / (finished_at - submitted_at) of the job (the
worker is already up and its model loaded), paired with an in-process run of (c) right before it.
The CLI's own wall time (python start-up, listing, 0.1 s polling) is shown too.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from benchmarks._common import (Meter, Queue, moto_child, quiet_random_weights, s3_bucket, write_jpegs,
                                zero_cost_engine)
from hnq.models import MODELS
from hnq.storage import FetchPolicy
from hnq.uris import path_to_file_uri
from worker.engine import build_engine
from worker.engine.classifier import Classifier
from worker.image.decode import decode_image
from worker.image.reference import reference_preprocess

BUCKET = "bench"


# ------------------------------------------------------------------------------------------- modes
def read_bytes(uri: str, path: Path | None) -> bytes:
    """How a home-made script gets the bytes: open() the file, or one S3 GetObject."""
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    from hnq.storage import s3_client
    from hnq.uris import parse_s3

    bucket, key = parse_s3(uri)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def top5(logits: torch.Tensor) -> list[int]:
    probs = torch.softmax(logits, dim=1)
    _, idx = probs.topk(5, dim=1)
    return [row[0] for row in idx.tolist()]


def mode_home_made(ctx) -> list[int]:
    net, out = ctx.clf.net, []
    with torch.no_grad():
        for uri, path in zip(ctx.uris, ctx.paths):
            x = reference_preprocess(read_bytes(uri, path)).unsqueeze(0)
            out += top5(net(x.to(ctx.clf.device)))
    return out


def mode_home_made_batched(ctx) -> list[int]:
    net, out, B = ctx.clf.net, [], ctx.args.batch_size
    with torch.no_grad():
        for i in range(0, len(ctx.uris), B):
            xs = [reference_preprocess(read_bytes(u, p))
                  for u, p in zip(ctx.uris[i:i + B], ctx.paths[i:i + B])]
            out += top5(net(torch.stack(xs).to(ctx.clf.device)))
    return out


def _through(engine, ctx) -> list:
    C = ctx.args.chunk_size
    chunks = [engine.submit(ctx.uris[i:i + C]) for i in range(0, len(ctx.uris), C)]
    return [r for c in chunks for r in c.result()]


def mode_ours(ctx) -> list[int]:
    out = []
    for recs in [_through(ctx.engine, ctx)]:
        bad = [r for r in recs if r.status != "ok"]
        if bad:
            raise RuntimeError(f"pipeline failed on {bad[0].uri}: {bad[0].error}")
        out += [r.top5[0].index for r in recs]
    return out


def mode_ref_preprocess(ctx) -> None:
    for data in ctx.blobs:
        reference_preprocess(data)


def mode_decode_seq(ctx) -> None:
    for data in ctx.blobs:
        decode_image(data)


def mode_loader_only(ctx) -> None:
    for r in _through(ctx.zero_engine, ctx):
        if r.status != "ok":
            raise RuntimeError(f"{r.uri}: {r.error}")


def mode_model_only(ctx) -> None:
    ctx.clf.predict(ctx.decoded)


MODES = [  # key, label, function
    ("a", "(a) home-made: PIL + batch 1", mode_home_made),
    ("b", "(b) home-made: PIL + batch B", mode_home_made_batched),
    ("c", "(c) ours: the streaming engine", mode_ours),
    ("ref", "    PIL reference preprocess (in RAM, 1 by 1)", mode_ref_preprocess),
    ("dec", "    our decode_image (in RAM, 1 by 1)", mode_decode_seq),
    ("load", "    our fetch+decode only (engine, zero-cost model)", mode_loader_only),
    ("model", "    our model only (predict, uint8 B)", mode_model_only),
]


class Ctx:
    pass


def timed_cpu(fn, ctx) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, fn's result)"""
    with Meter() as m:
        res = fn(ctx)
    return m.wall, m.cpu, res


# ------------------------------------------------------------------------------------------- queue
def run_queue(ctx, tmp: Path, s3_url: str | None, source: str) -> list[tuple[float, float, float]]:
    """[(job seconds, CLI wall seconds, paired in-process (c) seconds)] per repeat."""
    from tests.servers import s3_env

    a = ctx.args
    env = {"HARDNET_MODEL": a.model, "HARDNET_DEVICE": a.device, "HARDNET_BATCH_SIZE": str(a.batch_size),
           "HARDNET_FETCH_THREADS": str(a.fetch_threads), "HARDNET_DECODE_THREADS": str(a.decode_threads),
           "HARDNET_FILE_ROOTS": str(ctx.img_dir), "HARDNET_POLL_INTERVAL": "0.1",
           "HARDNET_CHUNK_SIZE": str(a.chunk_size)}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if s3_url:
        env.update(s3_env(s3_url))
    q = Queue(tmp, env, ready_timeout=180)
    out = []
    try:
        time.sleep(1.0)
        for r in range(a.repeat):
            t_c, _, _ = timed_cpu(mode_ours, ctx)
            info = q.submit([source, "--model", a.model, "--chunk-size", str(a.chunk_size)], timeout=900)
            if info["succeeded"] != len(ctx.uris):
                raise RuntimeError(f"job labelled {info['succeeded']} of {len(ctx.uris)}: {info}")
            job, wall = info["job_s"], info["cli_s"]
            out.append((job, wall, t_c))
            print(f"  queue repeat {r + 1}: job {job:.2f}s, CLI {wall:.2f}s, paired (c) {t_c:.2f}s",
                  flush=True)
    finally:
        q.stop()
    return out


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images (3/4 at 500x375, 1/4 at 1024x768)")
    ap.add_argument("--model", default="hardnet39ds", choices=MODELS)
    ap.add_argument("--batch-size", type=int, default=16, help="B of (b), (c) and the model-only run")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto (baselines run on it too)")
    ap.add_argument("--fetch-threads", type=int, default=64, help="engine fetch threads (worker default on the CPU: 64)")
    ap.add_argument("--decode-threads", type=int, default=0, help="engine decode threads (0 = allowed CPUs, the worker default)")
    ap.add_argument("--chunk-size", type=int, default=256, help="URIs per chunk handed to the engine (the producer's default chunk)")
    ap.add_argument("--modes", default=",".join(k for k, _, _ in MODES),
                    help="comma-separated subset of " + ",".join(k for k, _, _ in MODES))
    ap.add_argument("--s3", action="store_true", help="read the images from moto's S3 server instead of file://")
    ap.add_argument("--queue", action="store_true", help="also (d): redis-server + 1 worker + hardnet submit --wait")
    a = ap.parse_args()

    quiet_random_weights()
    logging.getLogger("worker.model.weights").setLevel(logging.ERROR)
    if a.threads:
        torch.set_num_threads(a.threads)
    keys = [k.strip() for k in a.modes.split(",") if k.strip()]
    modes = [m for m in MODES if m[0] in keys]

    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    s3 = None
    try:
        ctx = Ctx()
        ctx.args = a
        ctx.img_dir = tmp / "images"
        ctx.img_dir.mkdir()
        t0 = time.perf_counter()
        paths = write_jpegs(ctx.img_dir, a.n, sizes=((500, 375),) * 3 + ((1024, 768),))
        gen_s = time.perf_counter() - t0
        ctx.blobs = [p.read_bytes() for p in paths]
        policy = FetchPolicy(file_roots=(str(ctx.img_dir),))
        if a.s3:
            from tests.servers import s3_env

            s3 = moto_child()
            os.environ.update(s3_env(s3.url))
            from hnq.storage import reset_s3_client

            reset_s3_client()
            s3_bucket(s3.url, BUCKET, [(f"images/{p.name}", data) for p, data in zip(paths, ctx.blobs)])
            ctx.uris = [f"s3://{BUCKET}/images/{p.name}" for p in paths]
            ctx.paths = [None] * len(paths)
            source = f"s3://{BUCKET}/images/"
        else:
            ctx.uris = [path_to_file_uri(p) for p in paths]
            ctx.paths = paths
            source = str(ctx.img_dir)

        t0 = time.perf_counter()
        ctx.clf = Classifier(a.model, "random", device=a.device, batch_size=a.batch_size)
        load_s = time.perf_counter() - t0
        ctx.engine = build_engine(ctx.clf, policy, fetch_threads=a.fetch_threads,
                                  decode_threads=a.decode_threads)
        ctx.zero_engine = zero_cost_engine(ctx.clf, policy, fetch_threads=a.fetch_threads,
                                           decode_threads=a.decode_threads)
        ctx.decoded = torch.stack([decode_image(b) for b in ctx.blobs])

        mb = sum(map(len, ctx.blobs)) / 2**20
        print(f"bench_pipeline {datetime.now().isoformat(timespec='seconds')}  "
              f"python {platform.python_version()}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {ctx.clf.device}")
        print(f"model {a.model} (weights random), N={a.n} JPEGs ({a.n - a.n // 4} x 500x375, "
              f"{a.n // 4} x 1024x768, {mb:.1f} MiB) from {'s3 (moto, loopback)' if a.s3 else 'file://'}, "
              f"B={a.batch_size}, fetch threads {a.fetch_threads}, decode slots "
              f"{a.decode_threads or os.cpu_count()}, chunk {a.chunk_size}, repeat {a.repeat}")
        print(f"(generated in {gen_s:.1f}s, model built in {load_s:.1f}s)", flush=True)

        # warm-up: every batch shape the timed runs use, and each code path once on a few images
        with torch.inference_mode():
            shapes = {1, min(a.batch_size, a.n)} | ({a.n % a.batch_size} - {0})
            for s in sorted(shapes):
                ctx.clf.net(torch.zeros(s, 3, 224, 224, device=ctx.clf.device))
        warm = Ctx()
        warm.__dict__.update(ctx.__dict__)
        warm.uris, warm.paths, warm.blobs = ctx.uris[:4], ctx.paths[:4], ctx.blobs[:4]
        warm.decoded = ctx.decoded[:4]
        for _, _, fn in modes:
            fn(warm)

        times: dict[str, list[float]] = {k: [] for k, _, _ in modes}
        cpus: dict[str, list[float]] = {k: [] for k, _, _ in modes}
        top1: dict[str, list[int]] = {}
        for r in range(a.repeat):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for k, label, fn in order:
                t, c, res = timed_cpu(fn, ctx)
                times[k].append(t)
                cpus[k].append(c)
                if isinstance(res, list):
                    top1[k] = res
            print(f"  repeat {r + 1}/{a.repeat}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k, _, _ in modes),
                  flush=True)

        queue = run_queue(ctx, tmp, s3.url if s3 else None, source) if a.queue else []

        n = a.n
        print()
        print(f"{'mode':46s} {'images/s':>9s} {'ms/image':>9s} {'CPU ms/img':>10s}   images/s min..max over {a.repeat}")
        for k, label, _ in modes:
            ts = times[k]
            med = statistics.median(ts)
            cpu = statistics.median(cpus[k]) / n * 1e3
            print(f"{label:46s} {n / med:9.2f} {med / n * 1e3:9.2f} {cpu:10.2f}   {n / max(ts):.2f}..{n / min(ts):.2f}")
        if queue:
            jobs = [q[0] for q in queue]
            med = statistics.median(jobs)
            print(f"{'(d) queue: redis + 1 worker, submit --wait':46s} {n / med:9.2f} {med / n * 1e3:9.2f} {'':10s}   "
                  f"{n / max(jobs):.2f}..{n / min(jobs):.2f}   (job submitted->finished)")
            walls = [q[1] for q in queue]
            med = statistics.median(walls)
            print(f"{'    the same, hardnet CLI wall time':46s} {n / med:9.2f} {med / n * 1e3:9.2f} {'':10s}   "
                  f"{n / max(walls):.2f}..{n / min(walls):.2f}   (python start-up + listing + polling)")

        def ratio(num: str, den: str) -> None:
            if num in times and den in times:
                rs = [times[den][i] / times[num][i] for i in range(a.repeat)]
                best = min(times[den]) / min(times[num])
                print(f"  {num}/{den}: {statistics.median(rs):5.2f}x   (per repeat: "
                      + ", ".join(f"{x:.2f}" for x in rs) + f"; best vs best {best:.2f})")

        print("\nspeed ratios (images/s of the first / of the second; median of per-repeat ratios):")
        ratio("c", "a")
        ratio("c", "b")
        ratio("b", "a")
        ratio("dec", "ref")
        if queue:
            rs = [q[2] / q[0] for q in queue]
            print(f"  d/c: {statistics.median(rs):5.2f}x   (queue vs in-process, paired per repeat: "
                  + ", ".join(f"{x:.2f}" for x in rs) + ")")
        if "model" in times and "load" in times:
            m = n / statistics.median(times["model"])
            d = n / statistics.median(times["load"])
            serial = 1 / (1 / m + 1 / d)
            print(f"\nour parts alone: fetch+decode {d:.1f} img/s, model {m:.1f} img/s -> "
                  f"one after the other {serial:.1f} img/s, perfect overlap <= {min(m, d):.1f} img/s")
            if "c" in times:
                c = n / statistics.median(times["c"])
                print(f"(c) reached {c:.1f} img/s = {c / min(m, d):.0%} of the model-only rate")
        if "a" in top1 and "c" in top1:
            agree = sum(x == y for x, y in zip(top1["a"], top1["c"]))
            print(f"top-1 agreement (a) vs (c): {agree}/{n} (random weights; decode within 1 uint8 level)")
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
