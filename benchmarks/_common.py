"""What the benchmarks share, written once: photo-like JPEGs (and files of them), moto's S3 server
and the fault proxy in child processes (started through tests/servers.py and tests/faultproxy.py,
so that their CPU is theirs, measurable, and not taken from our GIL), CPU time and context
switches, a throwaway queue (redis-server + one `hardnet worker`, from tests/), zero-cost
stand-ins for the device stage, and the malloc re-exec the `hardnet` torch commands do.

The benchmarks run from the repository root as ``python -m benchmarks.NAME``;
``python -m benchmarks._common moto`` is the moto child that :func:`moto_child` starts.
torch and the worker's modules are imported inside the functions that need them: the S3 and
submit benchmarks run without them."""
from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ images
def photo_like_jpeg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photo (not a flat colour): gradients, a checker of edges,
    per-pixel noise; different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 6.3, 3).astype(np.float32)
    img = np.stack([
        120 + 100 * np.sin(x / w * 3.1 + y / h * 1.3 + ph[0]),
        60 + 150 * (x / w) * (y / h) + 30 * np.cos(ph[1] + x / w * 5),
        200 - 120 * np.cos(y / h * 4.0 + ph[2]),
    ], axis=-1)
    cell = max(8, w // int(rng.integers(8, 30)))
    img[(x // cell + y // cell) % 2 == 0] *= float(rng.uniform(0.55, 0.85))
    img += 5 * rng.standard_normal(img.shape, dtype=np.float32)
    b = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(b, "JPEG", quality=quality)
    return b.getvalue()


def write_jpegs(root: Path, n: int, sizes: tuple[tuple[int, int], ...] = ((500, 375),)) -> list[Path]:
    """n photo-like JPEGs written to root/imgNNNNN.jpg (seed = index); image i is sizes[i % len]."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"img{i:05d}.jpg"
        p.write_bytes(photo_like_jpeg(*sizes[i % len(sizes)], seed=i))
        out.append(p)
    return out


# --------------------------------------------------------------------------------------- measuring
def cpu_s(pid: int | None = None) -> float:
    """user+system CPU seconds of a process, all its threads, children not included: this one's
    by default (ns resolution), another one's from /proc (clock ticks)."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def context_switches() -> int:
    """Voluntary + involuntary context switches of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw + ru.ru_nivcsw


class Meter:
    """``with Meter() as m: ...``, then ``m.wall``, ``m.cpu`` (this process, all threads) and
    ``m.switches`` (context switches) of the block."""

    def __enter__(self) -> "Meter":
        self._sw, self._cpu, self._t = context_switches(), cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t
        self.cpu = cpu_s() - self._cpu
        self.switches = context_switches() - self._sw


def median_hi(xs):
    """The middle value; of an even count the upper one (what these benchmarks have printed as
    their median: statistics.median would average the two)."""
    return sorted(xs)[len(xs) // 2]


def log(msg: str) -> None:
    print(msg, flush=True)


def quiet_random_weights() -> None:
    """The benchmarks load ``random`` weights on purpose: no warning about it."""
    import warnings

    warnings.filterwarnings("ignore", message=".*RANDOM, untrained weights.*")


def rerun_argv() -> list[str]:
    """The command line that starts the running benchmark again (``python -m benchmarks.NAME``),
    for a measurement in a fresh process or a re-exec; run it with cwd=ROOT."""
    return [sys.executable, "-m", sys.modules["__main__"].__spec__.name]


# ----------------------------------------------------------------------------------------- servers
class Child:
    """A helper server in a child process that prints its URL on its first stdout line."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        line = self.proc.stdout.readline().strip()
        self.url = line.split()[-1] if line else ""
        if not self.url.startswith("http"):
            self.stop()
            raise RuntimeError(f"{argv[:3]} did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.terminate()
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def listing_keys(prefix: str, n: int, folders: int) -> list[str]:
    """n keys under prefix: prefix/pNNN/img-NNNNNN.jpg over `folders` folders, or (0) flat."""
    per = n // folders if folders else n
    return [f"{prefix}p{i // per:03d}/img-{i:06d}.jpg" if folders else f"{prefix}img-{i:06d}.jpg"
            for i in range(n)]


class MotoChild(Child):
    """moto's S3 server (tests/servers.MotoS3) in its own process: ``python -m benchmarks._common moto``."""

    def __init__(self):
        super().__init__([sys.executable, "-m", "benchmarks._common", "moto"])

    def fill(self, bucket: str, prefix: str, n: int, folders: int) -> float:
        """Empty objects under :func:`listing_keys` written into moto's store in its own process
        (its backend API, no HTTP: far quicker than PUTs); the seconds it took."""
        self.proc.stdin.write(f"fill {bucket} {prefix} {n} {folders}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())


def moto_child() -> MotoChild:
    return MotoChild()


def _serve_moto() -> None:
    """The moto child: prints its URL, then answers "fill BUCKET PREFIX N FOLDERS" lines until
    stdin closes."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from tests.servers import MotoS3

    m = MotoS3().start()
    print(m.url, flush=True)
    for line in sys.stdin:
        _, bucket, prefix, n, folders = (line.split() + ["0"])[:5]
        t0 = time.perf_counter()
        b = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        b.create_bucket(bucket, "us-east-1")
        for key in listing_keys(prefix, int(n), int(folders)):
            b.put_object(bucket, key, b"")
        print(f"{time.perf_counter() - t0:.3f}", flush=True)
    m.stop()


def proxy_child(upstream: str) -> Child:
    """tests/faultproxy.py as a process; prints 'LISTENING http://127.0.0.1:PORT'."""
    return Child([sys.executable, "-m", "tests.faultproxy", "--upstream", upstream])


def s3_client_for(url: str, pool: int = 10):
    """A boto3 S3 client for the loopback server at url, with test credentials."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=Config(max_pool_connections=pool))


def s3_bucket(url: str, bucket: str, objects=(), threads: int = 8):
    """Creates bucket on the loopback server at url and puts objects ((key, bytes) pairs) with
    `threads` threads; the client."""
    cl = s3_client_for(url, pool=max(10, threads))
    cl.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda kv: cl.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects))
    return cl


class Queue:
    """A throwaway redis-server and one `hardnet worker` process (random weights, CPU, unless
    env_extra says otherwise), and `hardnet submit --wait --json` against them."""

    def __init__(self, tmp: Path, env_extra: dict[str, str], ready_timeout: float = 300):
        from tests.cluster import Worker
        from tests.servers import RedisServer

        tmp.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(tmp / "redis").start()
        self.env = dict(os.environ)
        self.env.update({"HARDNET_BROKER_URL": self.redis.url, "HARDNET_WEIGHTS": "random",
                         "HARDNET_DEVICE": "cpu", "HARDNET_STATE_DIR": str(tmp / "state"),
                         "HARDNET_POLL_INTERVAL": "0.2", "PYTHONUNBUFFERED": "1",
                         "PYTHONWARNINGS": "ignore"})
        self.env.update(env_extra)
        self.worker = Worker(self.env, "bench", tmp)
        try:
            self.worker.wait_ready(timeout=ready_timeout)
        except BaseException:
            self.stop()
            raise

    def submit(self, args: list[str], timeout: float = 1800) -> dict:
        """The job's JSON, plus job_s (submitted_at to finished_at) and cli_s (the CLI's wall time:
        python start-up, listing, polling)."""
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "producer.cli", "submit", *args, "--wait", "--json"],
                           env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        cli_s = time.perf_counter() - t0
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        if not lines:
            raise RuntimeError(f"submit failed rc={p.returncode}: {p.stderr[-2000:]}\n{self.worker.log()[-2000:]}")
        info = json.loads(lines[-1])
        info["job_s"] = (datetime.fromisoformat(info["finished_at"])
                         - datetime.fromisoformat(info["submitted_at"])).total_seconds()
        info["cli_s"] = cli_s
        return info

    def engine_line(self) -> str:
        """The worker's last `engine:` log line (its stages' summary), or '?'."""
        eng = [ln for ln in self.worker.log().splitlines() if "engine:" in ln][-1:]
        return eng[0].split("engine:")[1].strip() if eng else "?"

    def stop(self) -> None:
        self.worker.stop()
        self.redis.stop()


# ------------------------------------------------------------------------------------- stand-ins
def zero_cost_runner(device, batch_size: int, k: int = 5):
    """The device stage with everything the model limit measures (normalise, forward, softmax,
    top-k) replaced by a constant result (benchmarks only): what is left is the engine's own
    host-side work, as on a GPU worker: stacking the batch into its buffer, the records."""
    import torch

    from worker.engine import DeviceRunner

    class ZeroCostRunner(DeviceRunner):
        def _forward(self, x):
            n = x.shape[0]
            return (torch.zeros((n, k), dtype=torch.float32, device=x.device),
                    torch.arange(k, device=x.device).expand(n, k))

    return ZeroCostRunner(torch.nn.Identity(), device, batch_size, amp=False, k=k)


class StackingRunner:
    """The device stage as the engine sees it on a GPU worker, with the device's own work left out
    (benchmarks only): each batch is stacked into one preallocated host buffer (the pinned buffer
    on CUDA) and gets a constant top-k. What is left of an image's cost is the engine's."""

    def __init__(self, batch_size: int, k: int = 5):
        import torch

        self.k = k
        self.buf = torch.empty((batch_size, 3, 224, 224), dtype=torch.uint8)

    def launch(self, images):
        import torch

        from worker.engine.device import Pending

        n = len(images)
        torch.stack(images, out=self.buf[:n])
        return Pending(n, result=([[0.5, 0.2, 0.1, 0.1, 0.1][:self.k]] * n, [list(range(self.k))] * n))

    def finish(self, p):
        return p.result[0], p.result[1], None


def zero_cost_engine(clf, policy, **kw):
    """The worker's engine with a :func:`zero_cost_runner` for its device stage (same fetch,
    decode, batcher, records)."""
    from worker.engine import Engine, EngineConfig, allowed_cpus
    from worker.engine import default_fetch_threads
    from hnq.storage import fetch

    runner = zero_cost_runner(clf.device, clf.batch_size)
    cfg = EngineConfig(batch_size=clf.batch_size,
                       fetch_threads=kw.get("fetch_threads") or default_fetch_threads(clf.device.type),
                       decode_threads=kw.get("decode_threads") or allowed_cpus())
    return Engine(fetch=lambda u: fetch(u, policy), decode=clf.decode, runner=runner,
                  record=clf.record, cfg=cfg)


def reexec_with_malloc_tuning(cpu_worker: bool = True) -> None:
    """Run under the same glibc malloc settings as `hardnet worker` (which re-executes itself
    with them): thresholds always, one arena as a CPU worker has (``cpu_worker``; a GPU worker
    keeps glibc's arenas, worker/commands.py says why)."""
    from worker.commands import MALLOC_ENV
    from worker.settings import WorkerSettings

    if WorkerSettings().tune_malloc and not all(k in os.environ for k in MALLOC_ENV):
        env = {**os.environ, **MALLOC_ENV}
        if cpu_worker:
            env.setdefault("MALLOC_ARENA_MAX", "1")
        argv = [*rerun_argv(), *sys.argv[1:]]
        os.execve(argv[0], argv, env)


if __name__ == "__main__":
    if sys.argv[1:] != ["moto"]:
        raise SystemExit("usage: python -m benchmarks._common moto")
    _serve_moto()
