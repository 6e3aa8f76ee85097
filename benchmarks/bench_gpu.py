"""The GPU benchmark table (run by scripts/gpu_check.sh on a lent H100/H200; rehearsed on the CPU
with small sizes by scripts/gpu_rehearsal.sh: `--device cpu --quick`).

    python -m benchmarks.bench_gpu [--device cuda] [--n-e2e 20000] [--models hardnet68,hardnet39ds]
                                   [--no-compile | --compiled-only] [--quick] [--out FILE.md [--append]]

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

What a device run with 15 minutes in all needs from it (issue 18):
* every row is caught: a row that fails is written as ``failed: <why>`` and the run goes on;
* every row is written as soon as it is measured: one JSON line appended (and flushed) to
  ``FILE.jsonl`` beside ``--out FILE.md``, and FILE.md rebuilt from all the lines, ratios included,
  so a run cut short by its step budget still leaves every row it measured; ``--append`` keeps
  the rows of an earlier invocation (gpu_check.sh runs the compiled rows last, in a second one);
* a GPU row never carries a CPU rate: the nvJPEG row counts the images nvJPEG really decoded and is
  ``failed`` when any went to the CPU fallback;
* the JPEGs are generated before anything imports torch, in a 'forkserver' pool (never a fork of a
  process with CUDA or compile threads);
* every child (worker, naive worker, redis-server) is stopped in a ``finally``; their process
  groups are also listed in ``$HNQ_CHILD_PGIDS`` (when set), for gpu_check.sh to kill when a step
  is cut off harder than a SIGINT.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from benchmarks._common import ROOT, photo_like_jpeg


class Failed(Exception):
    """A row that ran but measured nothing worth a figure (its message is the row's value)."""


class Table:
    """The rows, each appended to FILE.jsonl (flushed, fsynced) and FILE.md rebuilt at once."""

    def __init__(self, out: str | None, append: bool):
        self.md = Path(out) if out else None
        self.jsonl = self.md.with_suffix(".jsonl") if self.md else None
        self.rows: list[dict] = []
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            if append and self.jsonl.exists():
                for line in self.jsonl.read_text().splitlines():
                    try:
                        self.rows.append(json.loads(line))
                    except ValueError:
                        pass          # a line cut by a kill: the rows before it stand
            else:
                self.jsonl.write_text("")

    def add(self, row: dict) -> dict:
        row = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row}
        self.rows.append(row)
        print(render_row(row), flush=True)
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            tmp = self.md.with_suffix(".md.tmp")
            tmp.write_text(render(self.rows))
            os.replace(tmp, self.md)
        return row

    def info(self, text: str) -> None:
        self.add({"kind": "info", "row": text, "status": "info"})

    def skip(self, kind: str, name: str, why: str, **extra) -> None:
        self.add({"kind": kind, "row": name, "status": "skipped", "note": why, **extra})

    def measure(self, kind: str, name: str, fn, **extra) -> float | None:
        """Run one row: its value (img/s) or None when it failed (written as failed, with why).
        A KeyboardInterrupt (gpu_check.sh's step budget, `timeout -s INT`) is written as a failed
        row too, then raised, so that the callers' ``finally`` blocks stop their children."""
        t0 = time.monotonic()
        try:
            v = fn()
            note = ""
            if isinstance(v, tuple):
                v, note = v
            self.add({"kind": kind, "row": name, "status": "ok", "value": float(v), "note": note,
                      "seconds": round(time.monotonic() - t0, 1), **extra})
            return float(v)
        except KeyboardInterrupt:
            self.add({"kind": kind, "row": name, "status": "failed", "seconds": round(time.monotonic() - t0, 1),
                      "note": "interrupted: the step's time budget ran out", **extra})
            raise
        except Exception as e:  # noqa: BLE001 - a row that could not run says why; the run goes on
            why = str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {str(e).strip()[-300:]}"
            if not isinstance(e, Failed):
                traceback.print_exc()
            self.add({"kind": kind, "row": name, "status": "failed", "note": why.replace("\n", " "),
                      "seconds": round(time.monotonic() - t0, 1), **extra})
            return None


def render_row(r: dict) -> str:
    if r["status"] == "info":
        return f"| ({r['row']}) | | |"
    v = {"ok": f"{r.get('value', 0):.0f}", "skipped": "skipped"}.get(r["status"], "**failed**")
    note = (r.get("note") or "").replace("|", "/")
    secs = f" ({r['seconds']:.0f}s)" if "seconds" in r else ""
    return f"| {r['row']}{secs} | {v} | {note} |"


def _best(rows: list[dict], kind: str, **match) -> float | None:
    vals = [r["value"] for r in rows if r.get("kind") == kind and r["status"] == "ok"
            and all(r.get(k) == v for k, v in match.items())]
    return max(vals) if vals else None


def ratios(rows: list[dict]) -> list[str]:
    """The issue-7 targets from whatever rows are there (a missing figure: the ratio says so)."""
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if not e2e:
        return []
    out = []
    naive = _best(rows, "naive")
    for r in e2e:
        what = f"end to end (decode={r['decode']})"
        if r["status"] != "ok":
            out.append(f"{what}: {r['status']}, no ratio")
            continue
        model_lim = _best(rows, "model", model=r["model"])
        dec_lim = _best(rows, "decode", decode=r["decode"], limit=True)
        lims = {k: v for k, v in (("model limit", model_lim), ("decode limit", dec_lim)) if v}
        if lims:
            k, lim = min(lims.items(), key=lambda kv: kv[1])
            missing = [k2 for k2 in ("model limit", "decode limit") if k2 not in lims]
            out.append(f"{what} / min(model limit, decode limit) = {r['value']:.0f} / {lim:.0f} ({k}) "
                       f"= {r['value'] / lim:.2f}x (target >= 0.7x)"
                       + (f"; no {', '.join(missing)} row measured" if missing else ""))
        else:
            out.append(f"{what}: no model or decode limit measured, no ratio")
        out.append(f"{what} / naive worker = {r['value'] / naive:.1f}x (target >= 10x)" if naive
                   else f"{what} / naive worker: the naive row did not measure, no ratio")
    return out


def render(rows: list[dict]) -> str:
    heads = [r["row"] for r in rows if r.get("kind") == "header"]
    body = [render_row(r) for r in rows if r.get("kind") != "header"]
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    lines = [*heads, "", "| row | img/s | note |", "|---|---|---|", *body, "",
             *ratios(rows), f"{n['ok']} rows measured, {n['failed']} failed, {n['skipped']} skipped"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- images


def _gen(args) -> None:
    path, seed = args
    Path(path).write_bytes(photo_like_jpeg(500, 375, seed=seed))


def make_images(root: Path, n: int, distinct: int = 2000) -> list[Path]:
    """n photo-like 500x375 JPEGs, `distinct` different ones repeated (writing copies takes no
    time; generating 20,000 took ~20 s of a 16-core host's start). Called before torch is imported,
    and in a 'forkserver' pool all the same: a fork of a process that has CUDA, OpenMP or compile
    threads can hang."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"img{i:06d}.jpg" for i in range(n)]
    first = paths[:distinct]
    todo = [(str(p), i) for i, p in enumerate(first) if not p.exists()]
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(max(1, min(len(os.sched_getaffinity(0)), len(todo) or 1))) as pool:
        pool.map(_gen, todo, chunksize=16)
    for i, p in enumerate(paths[distinct:], start=distinct):
        if not p.exists():
            p.write_bytes(first[i % len(first)].read_bytes())
    return paths


# ----------------------------------------------------------------------------- rows


def model_limit(model: str, device, batch: int, mode: str, seconds: float) -> float:
    import torch

    from worker.engine import DeviceRunner
    from worker.engine.classifier import Classifier

    clf = Classifier(model, "random", device=str(device), batch_size=batch)
    r = DeviceRunner(clf.net, clf.device, batch, amp=clf.amp, compile=mode == "compiled",
                     cuda_graphs=mode == "graphs")
    r.warm_up()
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


def cpu_decode_rate(blobs: list[bytes], intra_op: int) -> float:
    import torch

    from worker.engine import allowed_cpus
    from worker.image.decode import decode_image

    own = torch.get_num_threads()
    torch.set_num_threads(intra_op)
    try:
        with ThreadPoolExecutor(allowed_cpus()) as ex:          # fresh threads: OpenMP teams of n
            list(ex.map(decode_image, blobs[:64]))
            t0 = time.perf_counter()
            list(ex.map(decode_image, blobs))
            return len(blobs) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(own)


def gpu_decode_rate(blobs: list[bytes], device, batch: int) -> tuple[float, str]:
    """nvJPEG's rate, counted only when every timed image was decoded by nvJPEG (the generated
    JPEGs are all baseline, so each one is eligible): a CPU fallback makes the row fail with the
    count, never a CPU rate under this name."""
    import torch

    from worker.image.decode import decode_image
    from worker.image.gpu_decode import GpuDecoder, resolve_decode_mode

    if device.type != "cuda":
        raise Failed(f"0 images on the GPU: {device} is not a CUDA device")
    resolve_decode_mode("gpu", device)      # ConfigError saying why nvJPEG does not work here
    g = GpuDecoder(device, max_pixels=89_478_485, cpu_decode=decode_image)
    g.decode_batch(blobs[:batch])
    before = dict(g.stats)
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        g.decode_batch(blobs[i:i + batch])
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    on_gpu = g.stats["gpu"] - before["gpu"]
    fell_back = g.stats["cpu"] - before["cpu"]
    failures = g.stats["batch_failures"] - before["batch_failures"]
    counts = f"{on_gpu} of {len(blobs)} images decoded on the GPU, {fell_back} on the CPU, {failures} failed batched calls"
    if on_gpu != len(blobs):
        raise Failed(f"nvJPEG fell back: {counts}")
    return len(blobs) / dt, counts


def register_child(pgid: int) -> None:
    """List a child's process group for gpu_check.sh (HNQ_CHILD_PGIDS), which kills the groups
    still alive when a step ends, however it ended."""
    f = os.environ.get("HNQ_CHILD_PGIDS")
    if f and pgid > 1:
        with open(f, "a") as fh:
            fh.write(f"{pgid}\n")


def start_redis(workdir: Path):
    from tests.servers import RedisServer

    redis = RedisServer(workdir).start()       # RuntimeError when redis-server is not on PATH
    try:
        register_child(int(redis.pidfile.read_text().strip()))   # daemonized: its own session
    except (OSError, ValueError):
        pass
    return redis


def _env(redis_url: str, tmp: Path, device: str, extra: dict) -> dict:
    env = dict(os.environ)
    env.update({"HARDNET_BROKER_URL": redis_url, "HARDNET_WEIGHTS": "random", "HARDNET_DEVICE": device,
                "HARDNET_FILE_ROOTS": str(tmp), "HARDNET_OUTPUT_ROOTS": str(tmp),
                "HARDNET_STATE_DIR": str(tmp / "state"), "HARDNET_POLL_INTERVAL": "0.2",
                "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    env.update(extra)
    return env


def end_to_end(tmp: Path, img_dir: Path, device: str, model: str, decode: str, timeout: float,
               ready_timeout: float) -> tuple[float, str]:
    from tests.cluster import Worker

    redis = start_redis(tmp / f"redis-{decode}")
    w = None
    try:
        env = _env(redis.url, tmp, device, {"HARDNET_MODEL": model, "HARDNET_DECODE": decode})
        w = Worker(env, f"e2e-{decode}", tmp)          # its own session (start_new_session)
        register_child(w.proc.pid)
        w.wait_ready(timeout=ready_timeout)
        p = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(img_dir), "--out",
                            str(tmp / f"out-{decode}"), "--wait", "--json", "--timeout", str(int(timeout))],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 30)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        eng = [ln.split("engine:")[1].strip() for ln in w.log().splitlines() if "engine:" in ln][-1:]
        if not lines:
            raise Failed(f"submit rc={p.returncode}: {p.stderr.strip()[-200:]}")
        info = json.loads(lines[-1])
        if not info.get("finished_at"):
            raise Failed(f"not finished: {info.get('state')} {info.get('succeeded')}/{info.get('total')}")
        if info.get("succeeded") != info.get("total"):
            raise Failed(f"{info.get('succeeded')} of {info.get('total')} images labelled")
        job_s = (datetime.fromisoformat(info["finished_at"])
                 - datetime.fromisoformat(info["submitted_at"])).total_seconds()
        note = f"{info['succeeded']} images; worker: {eng[0]}" if eng else f"{info['succeeded']} images"
        if decode == "gpu":
            note += "; HARDNET_DECODE=gpu (a worker without working nvJPEG refuses to start)"
        return info["succeeded"] / job_s, note
    finally:
        if w is not None:
            w.stop()
        redis.stop()


def naive(tmp: Path, paths: list[Path], device: str, model: str, seconds: float,
          ready_timeout: float) -> float:
    redis = start_redis(tmp / "redis-naive")
    proc = None
    try:
        env = _env(redis.url, tmp, device, {"NAIVE_MODEL": model, "NAIVE_DEVICE": device})
        log = open(tmp / "naive.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchmarks.naive_worker", "worker",
                                 "--pool=solo", "-Q", "naive", "--loglevel=WARNING", "--without-gossip",
                                 "--without-mingle"],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        register_child(proc.pid)
        import redis as redis_py

        os.environ["HARDNET_BROKER_URL"] = redis.url
        from benchmarks import naive_worker

        naive_worker.app.conf.broker_url = redis.url
        r = redis_py.Redis.from_url(redis.url)
        with naive_worker.app.producer_or_acquire() as prod:
            for p in paths:
                naive_worker.label.apply_async(args=[str(p)], producer=prod)
        deadline = time.monotonic() + ready_timeout
        while int(r.get("naive:done") or 0) < 5:    # model loaded, first images through
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"naive worker {'exited' if proc.poll() is not None else 'not ready'}: "
                             f"{(tmp / 'naive.log').read_text()[-300:]}")
            time.sleep(0.2)
        d0, t0 = int(r.get("naive:done") or 0), time.monotonic()
        time.sleep(seconds)
        return (int(r.get("naive:done") or 0) - d0) / (time.monotonic() - t0)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()


# ----------------------------------------------------------------------------- smoke


IMPORT_PACKAGES = ("hnq", "worker", "producer")
IMPORT_EXTRA = ("tests.servers", "tests.cluster", "celery", "kombu", "redis", "boto3", "obstore",
                "pydantic_settings", "prometheus_client", "torch", "torchvision", "PIL", "numpy")


def import_everything() -> str:
    """Every module of our packages and the third-party ones the check's steps use: what a kit
    that lacks a wheel, or a wheel built for another Python, breaks first."""
    import importlib
    import pkgutil

    names = list(IMPORT_EXTRA)
    for pkg in IMPORT_PACKAGES:
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=pkg + ".")]
    bad = []
    for n in names:
        try:
            importlib.import_module(n)
        except Exception as e:  # noqa: BLE001 - listed, all of them
            bad.append(f"{n}: {type(e).__name__}: {e}")
    if bad:
        raise Failed(f"{len(bad)} of {len(names)} modules failed to import: " + "; ".join(bad[:8]))
    import torch
    import torchvision

    return (f"{len(names)} modules; python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, cuda {torch.version.cuda} available={torch.cuda.is_available()}")


def one_batch(device: str, graphs: bool) -> str:
    import torch

    from worker.engine import DeviceRunner
    from worker.engine.classifier import Classifier

    clf = Classifier("hardnet39ds", "random", device=device, batch_size=8)
    r = DeviceRunner(clf.net, clf.device, 8, amp=clf.amp, cuda_graphs=graphs)
    scores, idx, ms = r.finish(r.launch(list(torch.zeros((8, 3, 224, 224), dtype=torch.uint8))))
    if len(scores) != 8 or len(idx[0]) != 5:
        raise Failed(f"unexpected result shape: {len(scores)} x {len(idx[0]) if idx else 0}")
    return f"hardnet39ds batch 8 on {clf.device}" + (f", {ms:.1f} ms on the device" if ms is not None else "")


def nvjpeg_probe(device: str) -> str:
    import torch

    from worker.image.gpu_decode import resolve_decode_mode

    return f"HARDNET_DECODE=gpu resolves to {resolve_decode_mode('gpu', torch.device(device))!r}"


def smoke(device: str) -> int:
    """gpu_check.sh's first stage: each check one line, stop at the first failure (rc 1)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*RANDOM, untrained weights.*")
    cuda = device.startswith("cuda")
    checks = [("imports", import_everything), ("one eager batch", lambda: one_batch(device, False)),
              ("one CUDA-graph batch", (lambda: one_batch(device, True)) if cuda else None),
              ("nvJPEG probe", (lambda: nvjpeg_probe(device)) if cuda else None)]
    for name, fn in checks:
        t0 = time.monotonic()
        if fn is None:
            print(f"smoke: {name}: skipped (device {device} is not CUDA)", flush=True)
            continue
        try:
            what = fn()
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, Failed):
                traceback.print_exc()
            print(f"smoke: {name}: FAILED after {time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}", flush=True)
            return 1
        print(f"smoke: {name}: ok ({time.monotonic() - t0:.1f}s): {what}", flush=True)
    return 0


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="hardnet68,hardnet39ds")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-e2e", type=int, default=20_000)
    ap.add_argument("--n-decode", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0, help="per model-limit row")
    ap.add_argument("--naive-seconds", type=float, default=20.0)
    ap.add_argument("--e2e-timeout", type=float, default=120.0, help="seconds for one end-to-end job")
    ap.add_argument("--ready-timeout", type=float, default=90.0, help="seconds for a worker to start")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    ap.add_argument("--compiled-only", action="store_true",
                    help="only the compiled model-limit rows (gpu_check.sh runs them last, with --append)")
    ap.add_argument("--compile-models", default="hardnet68",
                    help="models whose compiled row runs (compiling takes a minute or more each)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a rehearsal on the CPU")
    ap.add_argument("--out", help="write the table to this .md file (and its rows to the .jsonl beside it)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out's .jsonl")
    ap.add_argument("--smoke", action="store_true",
                    help="only the smoke checks (imports, one eager and one graph batch, the nvJPEG probe)")
    a = ap.parse_args()
    if a.smoke:
        return smoke(a.device)
    if a.quick:
        a.n_e2e, a.n_decode, a.seconds, a.naive_seconds, a.batch = 128, 64, 2.0, 5.0, 16
    table = Table(a.out, a.append)
    models = [m for m in a.models.split(",") if m]
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    t_start = time.monotonic()
    try:
        return run(a, table, models, tmp, t_start)
    except KeyboardInterrupt:
        table.info(f"interrupted after {time.monotonic() - t_start:.0f}s: the rows above are all this run measured")
        return 130


def run(a, table: Table, models: list[str], tmp: Path, t_start: float) -> int:
    paths: list[Path] = []
    if not a.compiled_only:
        # first, before torch exists in this process (make_images says why)
        t0 = time.monotonic()
        n_img = max(a.n_e2e, a.n_decode)
        try:
            paths = make_images(tmp / "images", n_img)
            table.info(f"generated {len(paths)} JPEGs 500x375 ({min(len(paths), 2000)} distinct) "
                       f"in {time.monotonic() - t0:.0f}s")
        except Exception as e:  # noqa: BLE001 - every row that needs them fails and says so below
            table.add({"kind": "images", "row": f"generate {n_img} JPEGs", "status": "failed",
                       "note": f"{type(e).__name__}: {e}"})
    import warnings

    warnings.filterwarnings("ignore", message=".*RANDOM, untrained weights.*")
    import torch

    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table.add({"kind": "header", "status": "info",
               "row": f"bench_gpu {datetime.now().isoformat(timespec='seconds')} on {name}; torch "
                      f"{torch.__version__}; {len(os.sched_getaffinity(0))} CPUs; batch {a.batch}"
                      + ("; --quick (CPU rehearsal sizes: figures meaningless)" if a.quick else "")})

    modes = ["compiled"] if a.compiled_only else ["eager", "graphs"] + ([] if a.no_compile else ["compiled"])
    for m in models:
        for mode in modes:
            if mode == "compiled" and m not in a.compile_models.split(","):
                continue
            name = f"model limit {m} {mode}, batch {a.batch} (incl. setup)"
            if mode == "graphs" and device.type != "cuda":
                table.skip("model", name, "CUDA graphs need a CUDA device", model=m, mode=mode)
                continue
            table.measure("model", name,
                          lambda: model_limit(m, device, a.batch, mode, a.seconds), model=m, mode=mode)
    if a.compiled_only:
        table.info(f"total time {time.monotonic() - t_start:.0f}s")
        return 0

    blobs = [p.read_bytes() for p in paths[:a.n_decode]]

    def need_images(fn):
        def wrapped():
            if not blobs:
                raise Failed("no images (their generation failed, see above)")
            return fn()
        return wrapped

    from worker.engine import allowed_cpus
    from worker.engine.cpus import intra_op_threads

    th, own = allowed_cpus(), torch.get_num_threads()
    worker_n = intra_op_threads(device.type) or own
    # First as the worker runs it (its intra-op rule): the limit the end-to-end row is held to;
    # then with torch's default, for the difference.
    for n, what in [(worker_n, "the worker's")] + ([(own, "torch's default")] if own != worker_n else []):
        table.measure("decode", f"decode limit CPU decode_image, {th} threads, {n} intra-op ({what})",
                      need_images(lambda n=n: cpu_decode_rate(blobs, n)), decode="cpu",
                      limit=what == "the worker's")
    table.measure("decode", f"decode limit GPU nvJPEG decode_batch, batch {a.batch}",
                  need_images(lambda: gpu_decode_rate(blobs, device, a.batch)), decode="gpu", limit=True)

    for p in paths[a.n_e2e:]:
        p.unlink()
    for mode in ("cpu", "gpu"):
        name = f"end to end {models[0]}, {a.n_e2e} JPEGs, HARDNET_DECODE={mode}"
        if mode == "gpu" and device.type != "cuda":
            table.skip("e2e", name, "HARDNET_DECODE=gpu needs a CUDA device", model=models[0], decode=mode)
            continue
        table.measure("e2e", name,
                      need_images(lambda mode=mode: end_to_end(tmp, tmp / "images", a.device, models[0], mode,
                                                               a.e2e_timeout, a.ready_timeout)),
                      model=models[0], decode=mode)
    table.measure("naive", f"naive one-task-per-image Celery worker ({models[0]}, PIL, batch 1, fp32)",
                  need_images(lambda: naive(tmp, paths[:2000], a.device, models[0], a.naive_seconds,
                                            a.ready_timeout)), model=models[0])
    table.info(f"total time {time.monotonic() - t_start:.0f}s")
    for line in ratios(table.rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
