"""How many CPUs this process may really use: its affinity mask and its cgroup CPU quota, not
``os.cpu_count()`` (a container limited to 4 CPUs on a 96-core host still sees 96 there)."""
from __future__ import annotations

import math
import os
from pathlib import Path


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), None = no limit."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def allowed_cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def intra_op_threads(device_type: str, setting: int = 0, environ=None) -> int | None:
    """torch's intra-op threads for a worker process, None = leave torch's own.

    ``setting`` (HARDNET_TORCH_THREADS) wins when not 0. Otherwise, with the model on a GPU, 1:
    the CPU work left is decoding, which the engine already spreads over one thread per CPU, and
    each of those threads gets an OpenMP team of its own from torch's resize kernels, so torch's
    default (one per core) puts cores x cores threads on the cores
    (fewer images/s at 16 threads per core, as torch's default gives a 16-core host, emulated on 2
    cores; figures: docs/performance.md#torchs-intra-op-threads-on-a-gpu-worker-benchmarksbench_decode_threadspy-2026-12-06-third-session).
    ``OMP_NUM_THREADS`` in the environment
    is the operator's choice and is kept. On the CPU the model's forward pass uses them: torch's
    own."""
    if setting:
        return setting
    env = os.environ if environ is None else environ
    if device_type == "cuda" and "OMP_NUM_THREADS" not in env:
        return 1
    return None
