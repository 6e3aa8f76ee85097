"""Pieces the benchmarks share: photo-like JPEGs, moto's S3 server and the fault proxy in child
processes (so that their CPU is theirs, measurable, and not taken from our GIL), CPU time of a
process, zero-cost stand-ins for the device stage, and the malloc re-exec the `hardnet` torch commands do."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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


def proc_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a process (all its threads) from /proc; children not included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


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
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.terminate()
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def moto_child() -> Child:
    code = ("import sys; from tests.servers import MotoS3; "
            "m = MotoS3().start(); print(m.url, flush=True); sys.stdin.read(); m.stop()")
    return Child([sys.executable, "-c", code])


def proxy_child(upstream: str) -> Child:
    """tests/faultproxy.py as a process; prints 'LISTENING http://127.0.0.1:PORT'."""
    return Child([sys.executable, str(ROOT / "tests" / "faultproxy.py"), "--upstream", upstream])


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
        # started as `python -m benchmarks.NAME`: re-executed the same way (not as a script)
        os.execve(sys.executable, [sys.executable, "-m", sys.modules["__main__"].__spec__.name,
                                   *sys.argv[1:]], env)
